"""The model card's latency and memory figures come from a child process that measures itself alone."""

from __future__ import annotations

from pathlib import Path

from bridge.report.latency import measure_in_subprocess, peak_rss_mib


def test_child_peak_memory_excludes_the_parent(tiny_model_dir: Path):
    """A parent holding 1.5 GiB does not show up in the child's peak, as ru_maxrss after a fork would."""
    ballast = bytearray(1536 * 1024 * 1024)
    ballast[:: 4096] = b"\x01" * len(range(0, len(ballast), 4096))
    assert peak_rss_mib() > 1536
    result = measure_in_subprocess(tiny_model_dir, ["Question: is this a test?"], max_new_tokens=4)
    del ballast
    assert "error" not in result, result
    assert result["answers"] == 1
    assert 0 < result["peak_rss_mib"] < 1200, result
    assert result["parameters"] > 0
    assert result["median_seconds_per_answer"] > 0
