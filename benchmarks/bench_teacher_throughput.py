"""Throughput of the teacher client against a local server that responds after a fixed latency.

The client sends ``rounds * concurrency`` distinct requests through the real ``openai`` client,
with a reservation and a settlement in the SQLite ledger for each, to the fake server in
``tests/fakes/openai_server.py``. With a server latency of L seconds the ideal throughput is
``concurrency / L`` requests per second; the script exits with status 1 when any measured
throughput is below ``--min-ratio`` of that.

    .venv/bin/python benchmarks/bench_teacher_throughput.py --concurrency 8 32
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from bridge.config import TeacherConfig
from bridge.teacher.backends import OpenAIBackend, TeacherRequest
from bridge.teacher.budget import Caps, PromptTokenBound
from bridge.teacher.client import Teacher
from bridge.teacher.ledger import Ledger
from bridge.teacher.prices import resolve_price
from fakes.openai_server import FakeOpenAIServer

KEY = "bench-key"


def measure(concurrency: int, *, latency_s: float = 0.5, rounds: int = 6) -> dict[str, float]:
    """Return the measured and ideal throughput for one concurrency level."""
    with FakeOpenAIServer(api_key=KEY, latency_s=latency_s) as server, tempfile.TemporaryDirectory() as tmp:
        os.environ["BRIDGE_BENCH_KEY"] = KEY
        config = TeacherConfig(
            backend="openai",
            base_url=server.base_url,
            model="fake-teacher",
            api_key_env="BRIDGE_BENCH_KEY",
            prompt_price_per_mtok=1.0,
            completion_price_per_mtok=2.0,
            max_tokens=64,
            timeout_s=30.0,
            concurrency=concurrency,
        )
        backend = OpenAIBackend(config, KEY)
        requests = [
            TeacherRequest(
                example_id=f"bench-{i}",
                messages=(
                    {"role": "system", "content": "You are a careful expert."},
                    {"role": "user", "content": f"Question {i}: is the result significant?"},
                ),
            )
            for i in range(rounds * concurrency)
        ]
        with Ledger(Path(tmp) / "ledger.sqlite") as ledger:
            teacher = Teacher(
                backend,
                ledger,
                resolve_price(config),
                Caps(),
                max_tokens=config.max_tokens,
                prompt_bound=PromptTokenBound(),
                concurrency=concurrency,
                progress=False,
            )
            started = time.perf_counter()
            outcomes = teacher.complete(requests)
            elapsed = time.perf_counter() - started
        backend.close()
        if any(not o.stopped_by_stop for o in outcomes):
            raise RuntimeError("some benchmark requests failed")
    throughput = len(requests) / elapsed
    ideal = concurrency / latency_s
    return {
        "concurrency": concurrency,
        "requests": len(requests),
        "seconds": elapsed,
        "throughput": throughput,
        "ideal": ideal,
        "ratio": throughput / ideal,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 32], help="Concurrency levels to measure.")
    parser.add_argument("--latency", type=float, default=0.5, help="Server latency per request, in seconds.")
    parser.add_argument("--rounds", type=int, default=6, help="Requests per concurrency slot.")
    parser.add_argument("--min-ratio", type=float, default=0.9, help="Lowest acceptable fraction of the ideal throughput.")
    args = parser.parse_args(argv)

    print("| concurrency | requests | seconds | requests/s | ideal requests/s | ratio |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    worst = 1.0
    for concurrency in args.concurrency:
        result = measure(concurrency, latency_s=args.latency, rounds=args.rounds)
        worst = min(worst, result["ratio"])
        print(
            f"| {concurrency} | {result['requests']} | {result['seconds']:.2f} | {result['throughput']:.1f} "
            f"| {result['ideal']:.1f} | {result['ratio']:.1%} |"
        )
    return 0 if worst >= args.min_ratio else 1


if __name__ == "__main__":
    sys.exit(main())
