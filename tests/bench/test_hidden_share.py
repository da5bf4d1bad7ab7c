"""The share of the round trip that pipelining hides (tandemspec.bench.figures.hidden_share)."""

from __future__ import annotations

import pytest

from tandemspec.bench.figures import hidden_share, hidden_shares, run_rows
from tandemspec.bench.runner import PromptRun


def _run(mode: str, rtt_ms: float, prompt: int, tpot_ms: float) -> PromptRun:
    stats = {"num_generated": 8, "num_target_passes": 3, "num_rounds": 3, "num_stale_frames": 0}
    return PromptRun(mode, rtt_ms, prompt, (1,), (2,) * 8, stats, 0.01, tpot_ms / 1e3, 3, 3, 3.0, 1.0)


def test_hidden_share_of_paired_prompts() -> None:
    """Synchronous TPOT grows by 30 ms from RTT 0 to 80, the pipelined one by 15 (12 and 18 per prompt): half hidden."""
    runs = []
    for prompt, grow in enumerate((12.0, 18.0)):
        runs += [_run("lossless-sync", 0, prompt, 10), _run("lossless-sync", 80, prompt, 40)]
        runs += [_run("lossless", 0, prompt, 11), _run("lossless", 80, prompt, 11 + grow)]
    runs.append(_run("lossless", 80, 7, 99.0))  # a prompt the others lack: left out
    figure = hidden_share(runs, "lossless", "lossless-sync", 80.0)
    assert figure is not None and figure["share"] == pytest.approx(0.5) and figure["num_prompts"] == 2
    assert figure["p05"] == pytest.approx(0.4) and figure["p95"] == pytest.approx(0.6)  # all of one prompt or the other
    assert hidden_share(runs, "lossless", "lossless-sync", 20.0) is None  # not run at that RTT
    assert hidden_share(runs, "lossless-defer", "lossless-sync", 80.0) is None
    assert set(hidden_shares(runs)) == {"lossless"} and set(hidden_shares(runs)["lossless"]) == {"80"}
    flat = [r for r in runs if r.mode == "lossless" or r.rtt_ms == 0] + [
        _run("lossless-sync", 80, p, 5) for p in (0, 1)
    ]
    assert hidden_share(flat, "lossless", "lossless-sync", 80.0) is None  # no round-trip cost to hide
    rows = run_rows(runs)
    assert rows[0]["mode"] == "lossless-sync" and rows[0]["tpot_ms"] == pytest.approx(10) and rows[0]["num_rounds"] == 3
