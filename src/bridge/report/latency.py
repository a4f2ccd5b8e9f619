"""Measure a model's CPU latency per answer and peak memory in a fresh process.

Run as ``python -m bridge.report.latency MODEL_DIR PROMPTS_JSON MAX_NEW_TOKENS``; it prints one
JSON object. A separate process gives a peak resident memory that belongs to this model alone.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def measure_in_subprocess(model_dir: Path, prompts: list[str], max_new_tokens: int, timeout_s: float = 900) -> dict[str, Any]:
    """Return latency and memory figures measured by a child process on the CPU."""
    payload = Path(model_dir) / ".latency_prompts.json"
    payload.write_text(json.dumps(prompts), encoding="utf-8")
    try:
        result = subprocess.run(
            [sys.executable, "-m", "bridge.report.latency", str(model_dir), str(payload), str(max_new_tokens)],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env={**__import__("os").environ, "CUDA_VISIBLE_DEVICES": ""},
        )
    finally:
        payload.unlink(missing_ok=True)
    if result.returncode != 0:
        return {"error": result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def peak_rss_mib() -> float:
    """Return this process's peak resident memory in MiB since it started its program.

    Linux's ``VmHWM`` belongs to the current address space, which exec replaces. ``ru_maxrss``
    is not reset by exec, so in a child started from a large process it reports the parent's
    memory at the fork. It is only the fallback where ``/proc`` is missing.
    """
    try:
        for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    # ru_maxrss is in KiB on Linux and in bytes on macOS.
    scale = 1024 * 1024 if sys.platform == "darwin" else 1024
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale, 1)


def _main(model_dir: str, prompts_file: str, max_new_tokens: str) -> dict[str, Any]:
    from bridge.config import ModelRef
    from bridge.models.inference import GenerationRequest, generate
    from bridge.models.loading import load_model

    prompts = json.loads(Path(prompts_file).read_text(encoding="utf-8"))
    started = time.perf_counter()
    lm = load_model(ModelRef(path=model_dir, device="cpu"))
    load_seconds = time.perf_counter() - started
    timings, tokens = [], 0
    for i, prompt in enumerate(prompts):
        t0 = time.perf_counter()
        out = generate(lm, [GenerationRequest(id=str(i), prompt=prompt)], max_new_tokens=int(max_new_tokens), progress=False)
        timings.append(time.perf_counter() - t0)
        tokens += out[0].completion_tokens
    timings.sort()
    return {
        "answers": len(timings),
        "load_seconds": round(load_seconds, 2),
        "median_seconds_per_answer": round(timings[len(timings) // 2], 3) if timings else None,
        "mean_seconds_per_answer": round(sum(timings) / len(timings), 3) if timings else None,
        "tokens_per_second": round(tokens / sum(timings), 1) if timings and sum(timings) else None,
        "peak_rss_mib": peak_rss_mib(),
        "parameters": sum(p.numel() for p in lm.model.parameters()),
    }


if __name__ == "__main__":
    sys.stdout.write(json.dumps(_main(*sys.argv[1:4])) + "\n")
