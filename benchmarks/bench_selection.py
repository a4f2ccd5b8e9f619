"""Time and memory of the scalable facility selector on Gaussian blobs, and its objective at 20,000.

Each pool size runs in its own process so that its peak resident memory is its own. Every
case selects 1 % of N through the partitioned path (k-means partitions, greedy across them);
at the smallest size the exact dense greedy also runs. The script prints the objective of
both subsets and of a random subset of the same size, then the mean difficulty and the
coverage of the partitioned picks for several values of lambda.

    .venv/bin/python benchmarks/bench_selection.py                     # 20,000, 250,000, 1,000,000
    .venv/bin/python benchmarks/bench_selection.py --sizes 20000 50000
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
import tracemalloc

import numpy as np

from bridge.selection.difficulty import rank_normalise
from bridge.selection.partition import partition_pool
from bridge.selection.selectors import facility_objective, select_facility, select_random


def make_blobs(n: int, dim: int, centers: int, spread: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Return unit-norm float32 points around ``centers`` random centres, and uniform difficulty ranks.

    A point is its centre (standard normal coordinates) plus ``spread`` times standard normal
    noise, so with spread 1 two points of one blob have cosine about 0.5 and points of
    different blobs about 0. Generated in chunks so that only the result is held in full.
    """
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((centers, dim)).astype(np.float32)
    points = np.empty((n, dim), dtype=np.float32)
    chunk = 65_536
    for lo in range(0, n, chunk):
        size = min(chunk, n - lo)
        block = centres[rng.integers(0, centers, size)]
        block += spread * rng.standard_normal((size, dim), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        points[lo : lo + size] = block
    return points, rank_normalise(rng.random(n))


def run_case(n: int, args: argparse.Namespace) -> dict[str, float | int]:
    """Select 1 % of a pool of n blob points through the partitioned path; measure time and memory."""
    # Imported before the clock starts: under load, importing scikit-learn takes seconds.
    import sklearn.cluster  # noqa: F401

    points, difficulty = make_blobs(n, args.dim, args.centers, args.spread, args.seed)
    k = math.ceil(args.fraction * n)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    tracemalloc.start()
    start = time.perf_counter()
    labels = partition_pool(points, args.partition_size, args.seed)
    partitioned = time.perf_counter()
    picks = select_facility(points, difficulty, k, lam=args.lam, labels=labels)
    finished = time.perf_counter()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    result: dict[str, float | int] = {
        "n": n,
        "k": k,
        "partitions": int(labels.max()) + 1,
        "partition_s": partitioned - start,
        "greedy_s": finished - partitioned,
        "total_s": finished - start,
        "peak_traced_mib": peak / 2**20,
        "data_mib": points.nbytes / 2**20,
        "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_before_mib": rss_before / 1024,
    }
    if n <= args.exact_check:
        start = time.perf_counter()
        exact = select_facility(points, difficulty, k, lam=args.lam)
        result["exact_s"] = time.perf_counter() - start
        value_exact = facility_objective(points, difficulty, [p.index for p in exact], args.lam)
        value_partitioned = facility_objective(points, difficulty, [p.index for p in picks], args.lam)
        random_subset = [p.index for p in select_random(n, k, seed=args.seed)]
        value_random = facility_objective(points, difficulty, random_subset, args.lam)
        result.update(
            objective_exact=value_exact,
            objective_partitioned=value_partitioned,
            objective_random=value_random,
            ratio_partitioned=value_partitioned / value_exact,
            ratio_random=value_random / value_exact,
        )
        for lam in (0.0, 0.1, 0.25, 0.5, 0.75, 1.0):
            chosen = [p.index for p in select_facility(points, difficulty, k, lam=lam, labels=labels)]
            result[f"lam_{lam:g}_difficulty"] = float(difficulty[chosen].mean())
            result[f"lam_{lam:g}_coverage"] = facility_objective(points, difficulty, chosen, 0.0)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 250_000, 1_000_000], help="pool sizes N")
    parser.add_argument("--dim", type=int, default=384, help="embedding dimensions")
    parser.add_argument("--centers", type=int, default=100, help="Gaussian blobs")
    parser.add_argument("--spread", type=float, default=1.0, help="noise standard deviation relative to the centres'")
    parser.add_argument("--fraction", type=float, default=0.01, help="subset size as a fraction of N")
    parser.add_argument("--lam", type=float, default=0.5, help="difficulty weight lambda")
    parser.add_argument("--partition-size", type=int, default=1000, help="target k-means partition size, in points")
    parser.add_argument("--exact-check", type=int, default=20_000, help="run the exact dense greedy up to this N")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.one is not None:
        print(json.dumps(run_case(args.one, args)))
        return

    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, numpy {np.__version__}")
    print(f"# dim {args.dim}, {args.centers} blobs, spread {args.spread}, lambda {args.lam}, partition size {args.partition_size}")
    rows = []
    for n in args.sizes:
        command = [sys.executable, __file__, "--one", str(n), *_options(args)]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        row = json.loads(output.strip().splitlines()[-1])
        rows.append(row)
        line = (
            f"N={row['n']:>9,} k={row['k']:>6,} partitions={row['partitions']:>5} "
            f"partition {row['partition_s']:7.1f} s  greedy {row['greedy_s']:7.1f} s  total {row['total_s']:7.1f} s  "
            f"peak traced {row['peak_traced_mib']:7.0f} MiB  max RSS {row['max_rss_mib']:7.0f} MiB (data {row['data_mib']:.0f} MiB)"
        )
        print(line, flush=True)
        if "ratio_partitioned" in row:
            print(
                f"  objective: exact dense greedy {row['objective_exact']:.5f} ({row['exact_s']:.1f} s), "
                f"partitioned {row['objective_partitioned']:.5f} (ratio {row['ratio_partitioned']:.4f}), "
                f"random {row['objective_random']:.5f} (ratio {row['ratio_random']:.4f})",
                flush=True,
            )
            for lam in (0.0, 0.1, 0.25, 0.5, 0.75, 1.0):
                print(
                    f"  lambda {lam:<4g}: mean rank difficulty of picks {row[f'lam_{lam:g}_difficulty']:.3f}, "
                    f"coverage term {row[f'lam_{lam:g}_coverage']:.4f}",
                    flush=True,
                )
    by_n = {row["n"]: row for row in rows}
    if 250_000 in by_n and 1_000_000 in by_n:
        ratio = by_n[1_000_000]["total_s"] / by_n[250_000]["total_s"]
        print(f"time ratio 1,000,000 / 250,000: {ratio:.2f} (target <= 5)")


def _options(args: argparse.Namespace) -> list[str]:
    return [
        "--dim", str(args.dim), "--centers", str(args.centers), "--spread", str(args.spread),
        "--fraction", str(args.fraction), "--lam", str(args.lam), "--partition-size", str(args.partition_size),
        "--exact-check", str(args.exact_check), "--seed", str(args.seed),
    ]


if __name__ == "__main__":
    main()
