"""The metrics logger's timing rules, fed step records with made-up times (no clock).

A window's seconds are the time between step completions (so a step the host delayed shows
the delay), averaged over the window; a window more than 1.5x away from the median so far,
the first (warm-up) window, and a window where the device waited for the host carry a note.
"""

import json
import types
from pathlib import Path
from typing import Any

import pytest
from conftest import TINY
from nnxtrain.plugins.metrics_logger import MetricsLogger
from rich.console import Console

from nnxtrain import LazyMetrics, StepEndEvent, StepRecord, step_flops

METRICS = dict(loss=2.0, lm_loss=1.9, z_loss=0.1, perplexity=6.7, total_weights=64.0)
METRICS |= dict(grad_norm=1.0, lr=1e-3)


def records(times: list[tuple[float, float]]) -> list[StepRecord]:
    """StepRecords of steps 1, 2, ... dispatched and completed at the given (fake) times,
    with seconds and host gap worked out as `nnxtrain.timing.StepWatcher` does."""
    out, last = [], None
    for step, (dispatched, completed) in enumerate(times, start=1):
        start = dispatched if last is None else last
        gap = 0.0 if last is None else max(0.0, dispatched - last)
        out.append(StepRecord(step, dispatched, completed, completed - start, gap, METRICS))
        last = completed
    return out


def log(tmp_path: Path, recs: list[StepRecord], log_every: int = 1) -> dict[int, dict[str, Any]]:
    """Runs the logger's hooks over `recs`; returns metrics.jsonl as step -> record."""
    console = Console(file=open(tmp_path / "console.txt", "w"), width=300)  # noqa: SIM115
    trainer = types.SimpleNamespace(console=console)
    flops = step_flops(TINY, batch_size=4, seq_len=16, num_devices=1)
    logger = MetricsLogger(log_every=log_every, tensorboard=False, progress=False)
    logger.on_setup(trainer, types.SimpleNamespace(flops=flops, run_dir=str(tmp_path)))  # type: ignore[arg-type]
    for r in recs:

        def get(r: StepRecord = r) -> StepRecord:
            return r

        event = StepEndEvent(r.step, len(recs), 64, LazyMetrics(get), get)
        logger.on_step_end(trainer, event)  # type: ignore[arg-type]
    logger.teardown(trainer)  # type: ignore[arg-type]
    console.file.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    return {x["step"]: x for x in map(json.loads, lines)}


def test_notes_follow_the_rules(tmp_path):
    times = [(0.0, 1.0)]  # step 1: compile and first step
    # Steps 2-5: dispatched before the previous one completed, 0.1 s each (1.1 ... 1.4).
    times += [(0.9, 1.1), (1.0, 1.2), (1.1, 1.3), (1.2, 1.4)]
    times.append((1.9, 2.0))  # step 6: dispatched 0.5 s after step 5 completed (the host)
    times.append((1.95, 2.3))  # step 7: 0.3 s, no host gap: 3x the median (load or noise)
    times.append((2.25, 2.44))  # step 8: 0.14 s: within 1.5x of the median, no note
    times.append((2.4, 2.49))  # step 9: 0.05 s: less than the median / 1.5
    lines = log(tmp_path, records(times))
    assert sorted(lines) == list(range(1, 10))
    notes = {step: line.get("note", "") for step, line in lines.items()}
    assert "warm-up" in notes[1]
    assert [s for s in range(2, 10) if notes[s]] == [2, 6, 7, 9]
    assert "0.10x the median" in notes[2]  # the only window before it is the warm-up's
    assert "waited 0.500 s for the host" in notes[6]
    assert "3.00x the median" in notes[7]
    assert "0.50x the median" in notes[9]
    # Seconds are completion to completion: step 6 shows the host's 0.5 s, not 0.1 s.
    assert lines[6]["seconds"] == pytest.approx(0.6)
    assert lines[2]["seconds"] == pytest.approx(0.1)
    assert lines[6]["tokens_per_sec_per_device"] == pytest.approx(64 / 0.6)


def test_a_window_averages_its_steps_and_sums_their_host_gaps(tmp_path):
    times = [(0.0, 1.0), (0.9, 1.1), (1.0, 1.2), (1.1, 1.3)]  # first window: steps 1-4
    # Second window: 0.1 s of host gap before steps 6 and 8 each, 0.2 s in all.
    times += [(1.2, 1.4), (1.5, 1.6), (1.55, 1.7), (1.8, 1.9)]
    lines = log(tmp_path, records(times), log_every=4)
    assert sorted(lines) == [4, 8]
    assert lines[4]["seconds"] == pytest.approx(1.3 / 4)  # from step 1's dispatch
    assert lines[8]["seconds"] == pytest.approx((1.9 - 1.3) / 4)  # from step 4's completion
    assert "warm-up" in lines[4]["note"]
    # 0.2 s of gaps is more than a quarter of the window's 0.6 s (each gap alone is not).
    assert "waited 0.200 s for the host" in lines[8]["note"]
