"""The metrics logger's timing rules, fed step records with made-up times (no clock), and
its records across resumes.

A window's seconds are the time between step completions (so a step the host delayed shows
the delay), averaged over the window; a window more than 1.5x away from the median so far,
the first (warm-up) window, and a window where the device waited for the host carry a note.
On a resume the records after the restored step, and a line a kill tore, leave metrics.jsonl
(through a complete new file, or not at all) and TensorBoard is told to hide those steps.
"""

import io
import json
import os
import struct
import sys
import types
from pathlib import Path
from typing import Any

import pytest
from conftest import TINY
from nnxtrain.plugins.metrics_logger import MetricsLogger
from rich.console import Console

from nnxtrain import (
    EvalEndEvent,
    Goodput,
    LazyMetrics,
    StepEndEvent,
    StepRecord,
    TrainStartEvent,
    UserError,
    drop_records_after,
    step_flops,
)

METRICS = dict(loss=2.0, lm_loss=1.9, z_loss=0.1, perplexity=6.7, total_weights=64.0)
METRICS |= dict(grad_norm=1.0, lr=1e-3, skipped=0.0)


def records(times: list[tuple[float, float]], first: int = 1) -> list[StepRecord]:
    """StepRecords of steps first, first + 1, ... dispatched and completed at the given
    (fake) times, with seconds and host gap worked out as `timing.StepWatcher` does."""
    out, last = [], None
    for step, (dispatched, completed) in enumerate(times, start=first):
        start = dispatched if last is None else last
        gap = 0.0 if last is None else max(0.0, dispatched - last)
        out.append(StepRecord(step, dispatched, completed, completed - start, gap, METRICS))
        last = completed
    return out


def log(
    tmp_path: Path,
    recs: list[StepRecord],
    log_every: int = 1,
    start: int = 0,
    tensorboard: bool = False,
) -> dict[int, dict[str, Any]]:
    """Runs the logger's hooks over `recs` in a run that starts at step `start`; returns
    metrics.jsonl as step -> record."""
    console = Console(file=open(tmp_path / "console.txt", "a"), width=300)  # noqa: SIM115
    trainer = types.SimpleNamespace(console=console, goodput=Goodput())
    flops = step_flops(TINY, batch_size=4, seq_len=16, num_devices=1)
    logger = MetricsLogger(log_every=log_every, tensorboard=tensorboard, progress=False)
    logger.on_setup(trainer, types.SimpleNamespace(flops=flops, run_dir=str(tmp_path)))  # type: ignore[arg-type]
    logger.on_train_start(trainer, TrainStartEvent(start, start + len(recs)))  # type: ignore[arg-type]
    for r in recs:

        def get(r: StepRecord = r) -> StepRecord:
            return r

        event = StepEndEvent(r.step, start + len(recs), 64, LazyMetrics(get), get)
        logger.on_step_end(trainer, event)  # type: ignore[arg-type]
    logger.teardown(trainer)  # type: ignore[arg-type]
    console.file.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    return {x["step"]: x for x in map(json.loads, lines)}


def test_a_step_or_evaluation_without_loss_tokens_reports_no_loss(tmp_path):
    """A loss of 0 over no token is no measurement: `n/a` and null, never `ppl 1.000`."""
    recs = records([(0.0, 1.0), (1.0, 2.0)])
    empty = METRICS | dict(loss=0.0, lm_loss=0.0, z_loss=0.0, perplexity=1.0, total_weights=0.0)
    recs[1] = StepRecord(2, 1.0, 2.0, 1.0, 0.0, empty)
    logged = log(tmp_path, recs, tensorboard=True)
    assert logged[1]["loss"] == 2.0
    assert [logged[2][k] for k in ("loss", "lm_loss", "z_loss", "perplexity")] == [None] * 4
    console = (tmp_path / "console.txt").read_text().splitlines()
    assert "| loss 2.0000 | lm_loss 1.9000 | ppl 6.700 |" in console[0]
    assert "| weights 0 | loss n/a | lm_loss n/a | ppl n/a |" in console[1]
    logger = MetricsLogger(progress=False, tensorboard=False)
    printed = Console(file=io.StringIO(), width=300)
    trainer = types.SimpleNamespace(console=printed)
    m = {"eval/loss": 0.0, "eval/lm_loss": 0.0, "eval/perplexity": 1.0, "eval/total_weights": 0}
    logger.on_eval_end(trainer, EvalEndEvent(5, m, 2, 0.1))  # type: ignore[arg-type]
    assert "| loss n/a | ppl n/a" in printed.file.getvalue()


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


def write_lines(path: Path, *lines: str) -> bytes:
    path.write_bytes("".join(lines).encode())
    return path.read_bytes()


STEPS_1_TO_4 = [json.dumps({"step": s, "loss": 5.0 - s}) + "\n" for s in range(1, 5)]
EVAL_2 = json.dumps({"step": 2, "eval/loss": 3.5}) + "\n"
EVAL_4 = json.dumps({"step": 4, "eval/loss": 3.0}) + "\n"


def test_a_resume_drops_the_records_after_its_step_and_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    a, b, c, d = STEPS_1_TO_4
    write_lines(path, a, b, EVAL_2, c, d, EVAL_4, '{"step": 5, "loss": 0.')  # killed mid-write
    assert drop_records_after(str(path), 2) == 4
    assert path.read_text() == a + b + EVAL_2  # the kept lines as they were
    assert not [n for n in os.listdir(tmp_path) if n != "metrics.jsonl"]  # no temporary left


def test_a_torn_line_is_dropped_even_when_its_step_is_kept(tmp_path):
    path = tmp_path / "metrics.jsonl"
    a, b, c, _ = STEPS_1_TO_4
    # A torn line that a logger without this fix then appended to, and a last record cut
    # just before its newline (whole, so kept).
    write_lines(path, a, '{"st' + b, c.rstrip("\n"))
    assert drop_records_after(str(path), 3) == 1
    assert path.read_text() == a + c


def test_a_fresh_run_starts_from_an_empty_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_lines(path, *STEPS_1_TO_4, EVAL_4)
    assert drop_records_after(str(path), 0) == 5
    assert path.read_bytes() == b""
    assert drop_records_after(str(tmp_path / "missing.jsonl"), 3) == 0


def test_a_file_with_nothing_to_drop_is_not_rewritten(tmp_path):
    path = tmp_path / "metrics.jsonl"
    before = write_lines(path, *STEPS_1_TO_4, EVAL_4)
    inode = path.stat().st_ino
    assert drop_records_after(str(path), 4) == 0
    assert path.read_bytes() == before and path.stat().st_ino == inode


def test_a_failed_rewrite_leaves_the_old_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    before = write_lines(path, *STEPS_1_TO_4, '{"step": 5, "lo')

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError):
        drop_records_after(str(path), 2)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["metrics.jsonl"]
    # Through the logger: one line that names the file and the fix.
    with pytest.raises(UserError, match=r"metrics.jsonl: .*step 2 .*No space left.* Fix: "):
        log(tmp_path, records([(0.0, 1.0)]), start=2)
    assert path.read_bytes() == before


def test_a_resumed_logger_writes_each_step_once(tmp_path):
    log(tmp_path, records([(0.0, 1.0), (1.0, 1.1), (1.1, 1.2)]))  # steps 1-3
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss"')  # the kill came in the middle of step 4's line
    resumed = records([(0.0, 1.0), (1.0, 1.1), (1.1, 1.2), (1.2, 1.3)], first=2)  # steps 2-5
    logger_lines = (tmp_path / "metrics.jsonl").read_text()
    lines = log(tmp_path, resumed, start=1)
    text = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in text] == [1, 2, 3, 4, 5]
    assert lines[1] == json.loads(logger_lines.splitlines()[0])  # kept as it was
    assert "warm-up" in lines[2]["note"]  # written by the resumed logger
    console = (tmp_path / "console.txt").read_text()
    assert "metrics: dropped 3 record(s) after step 1" in console


def test_eval_records_after_the_restored_step_are_dropped(tmp_path):
    trainer = types.SimpleNamespace(console=Console(file=open(os.devnull, "w")), goodput=Goodput())  # noqa: SIM115
    flops = step_flops(TINY, batch_size=4, seq_len=16, num_devices=1)
    for start, evals in ((0, (2, 4)), (2, (4,))):
        logger = MetricsLogger(tensorboard=False, progress=False)
        logger.on_setup(trainer, types.SimpleNamespace(flops=flops, run_dir=str(tmp_path)))  # type: ignore[arg-type]
        logger.on_train_start(trainer, TrainStartEvent(start, 4))  # type: ignore[arg-type]
        for step in evals:
            metrics = {"eval/loss": float(start), "eval/perplexity": 1.0}
            logger.on_eval_end(trainer, EvalEndEvent(step, metrics, 1, 0.1))  # type: ignore[arg-type]
        logger.teardown(trainer)  # type: ignore[arg-type]
    records_ = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # Step 2's evaluation is the first run's; step 4's only the resumed run's.
    assert [(r["step"], r["eval/loss"]) for r in records_] == [(2, 0.0), (4, 2.0)]


def tensorboard_events(run_dir: Path) -> list[Any]:
    """Every event in the run's TensorBoard files (TFRecord framing: length, CRC, data, CRC)."""
    event_pb2 = pytest.importorskip("tensorboardX.proto.event_pb2")
    events = []
    for path in sorted((run_dir / "tensorboard").iterdir()):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            events.append(event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length]))
            pos += 12 + length + 4
    return events


def test_tensorboard_hides_the_steps_after_the_restored_one(tmp_path):
    pytest.importorskip("tensorboardX")
    log(tmp_path, records([(0.0, 1.0), (1.0, 1.1)]), tensorboard=True)
    # Its file is named by the second it was opened in: keep the resumed run's from
    # overwriting it (a real resume comes seconds later).
    (first,) = (tmp_path / "tensorboard").iterdir()
    first.rename(f"{first}.first")
    resumed = records([(0.0, 1.0), (1.0, 1.1)], first=2)
    log(tmp_path, resumed, start=1, tensorboard=True)
    # TensorBoard drops every earlier event at a step >= that of a SessionLog START.
    starts = [e.step for e in tensorboard_events(tmp_path) if e.session_log.status == 1]
    assert sorted(starts) == [1, 2]  # the first run from step 1, the resumed one from 2


def test_without_tensorboardx_the_logger_says_how_to_install_it(tmp_path, monkeypatch):
    """rich took `[tensorboard]` for markup: the line read `pip install 'nnxtrain'`."""
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # its import fails
    log(tmp_path, records([(0.0, 1.0)]), tensorboard=True)
    assert (
        "TensorBoard logging off (pip install 'nnxtrain[tensorboard]')"
        in (tmp_path / "console.txt").read_text()
    )
    assert not (tmp_path / "tensorboard").exists()
