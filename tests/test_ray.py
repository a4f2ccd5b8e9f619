"""Selection scoring on Ray Data workers against the plain in-process path.

Ray starts several servers (GCS, raylet, object manager, workers) that listen on all network
interfaces and, in Ray 2.60, on the machine's own address even with
``_node_ip_address="127.0.0.1"``. So Ray runs in a child process inside a private network
namespace with only loopback up, where nothing outside the machine can reach those servers. In
CI (``BRIDGE_CI=1``) without user namespaces the child runs directly, and a missing Ray fails
the test there instead of skipping it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

TESTS_DIR = Path(__file__).resolve().parent
IN_CI = os.environ.get("BRIDGE_CI") == "1"

# Settings under which the plain and the Ray paths must write the same rows: two scoring chunks
# of 16 and 4 examples (a chunk is selection.batch_size * 8), and a sampled second answer.
OVERRIDES = [
    "selection.batch_size=2",
    "selection.samples=2",
    "tutoring.max_new_tokens=6",
    "tutoring.temperature=0.9",
    "seed=3",
]
POOL_SIZE = 20


def _ray_installed() -> bool:
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        return False
    return True


def _score(lm: Any, root: Path, kind: str) -> None:
    """Run the selection stage's pool scoring for ``kind`` into ``root/select``."""
    from bridge.config import load_config
    from bridge.prompts import render_all
    from bridge.stages.select import score_pool
    from test_engines import TASK, StageContext, make_examples

    config = load_config(None, OVERRIDES)
    examples = make_examples(POOL_SIZE)
    style = "answer_only" if kind == "option_entropy" else "rationale"
    rendered, skipped = render_all(examples, TASK, style=style, tokenizer=lm.tokenizer)
    assert not skipped
    by_id = {e.id: e for e in examples}
    score_pool(StageContext(config, root), lm, TASK, [(by_id[r.example_id], r) for r in rendered], kind)


def _sampled_texts(lm: Any) -> dict[str, str]:
    """Return sampled completions of the pool's rationale prompts by id (batches of 2, seed 3)."""
    from bridge import engines
    from bridge.models.inference import GenerationRequest
    from bridge.prompts import render_all, render_text
    from test_engines import TASK, make_examples

    rendered, _ = render_all(make_examples(POOL_SIZE), TASK, style="rationale", tokenizer=lm.tokenizer)
    requests = [GenerationRequest(id=r.example_id, prompt=render_text(r, lm.tokenizer)) for r in rendered]
    outputs = engines.generate(lm, requests, max_new_tokens=8, temperature=0.9, seed=3, batch_size=2, progress=False)
    return {g.id: g.text for g in outputs}


def child_main(out: Path, model_dir: Path) -> None:
    """Score the pool on the plain path and on Ray, writing each under ``out/<path>/<kind>``."""
    import ray
    import torch

    from bridge.config import ModelRef, RayEngineConfig
    from bridge.engines.ray_engine import RayEngine
    from bridge.models.loading import load_model

    # Ray sets OMP_NUM_THREADS to a task's num_cpus (1 here), so the plain path uses one thread too.
    torch.set_num_threads(1)
    ref = ModelRef(path=str(model_dir), device="cpu", dtype="float32")
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1")
    try:
        plain = load_model(ref)
        engine = RayEngine(ref, RayEngineConfig(workers=2))
        for kind in ("option_entropy", "answer_entropy"):
            _score(plain, out / "plain" / kind, kind)
            _score(engine, out / "ray" / kind, kind)
        for name, lm in (("plain", plain), ("ray", engine)):
            (out / name / "sampled.json").write_text(json.dumps(_sampled_texts(lm)), encoding="utf-8")
    finally:
        ray.shutdown()


def _loopback_prefix() -> list[str]:
    from test_accelerate import loopback_namespace_prefix

    return loopback_namespace_prefix()


def _read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.slow
def test_ray_rows_equal_plain_path(tmp_path):
    from test_engines import save_varied_model

    if not _ray_installed():
        message = "Ray Data is not installed: pip install 'bridge-distill[ray]'"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    prefix = _loopback_prefix()
    if not prefix and not IN_CI:
        pytest.skip("no private network namespace (unshare --user --net) for Ray's servers; runs in CI")

    model_dir = save_varied_model(tmp_path / "model")
    out = tmp_path / "out"
    command = [
        *prefix,
        sys.executable,
        "-c",
        "import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); import test_ray; "
        "test_ray.child_main(Path(sys.argv[2]), Path(sys.argv[3]))",
        str(TESTS_DIR),
        str(out),
        str(model_dir),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false"}
    completed = subprocess.run(command, capture_output=True, text=True, timeout=170, env=env, check=False)
    assert completed.returncode == 0, completed.stderr[-4000:]

    for kind in ("option_entropy", "answer_entropy"):
        plain_dir = out / "plain" / kind / "select"
        ray_dir = out / "ray" / kind / "select"
        plain_rows = _read_rows(plain_dir / "scores.jsonl")
        ray_rows = _read_rows(ray_dir / "scores.jsonl")
        assert len(plain_rows) == POOL_SIZE
        assert {row["chunk"] for row in plain_rows} == {0, 1}
        assert ray_rows == plain_rows, kind

        chunks = sorted(path.name for path in plain_dir.glob("embeddings/*.npy"))
        assert chunks == sorted(path.name for path in ray_dir.glob("embeddings/*.npy"))
        for name in chunks:
            expected = np.load(plain_dir / "embeddings" / name)
            found = np.load(ray_dir / "embeddings" / name)
            assert expected.shape[1] > 1
            np.testing.assert_array_equal(found, expected)

    # Sampled texts match only when every batch gets the same seed as on the plain path.
    plain_texts = json.loads((out / "plain" / "sampled.json").read_text(encoding="utf-8"))
    ray_texts = json.loads((out / "ray" / "sampled.json").read_text(encoding="utf-8"))
    assert len(plain_texts) == POOL_SIZE
    assert len(set(plain_texts.values())) > 1
    assert ray_texts == plain_texts


if __name__ == "__main__":
    child_main(Path(sys.argv[1]), Path(sys.argv[2]))
