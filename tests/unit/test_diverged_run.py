"""A way back from a diverged run: the checkpoints saved after the divergence began are set
aside (`checkpoints/diverged/<step>`), the last one before it is kept whatever `keep`
says, the exit line names the step a rerun resumes from, and a rerun with a sane learning
rate trains from there (issue 24).

The checkpointer's part is tested through its hooks with a stand-in trainer and a tiny
state (no model is built or compiled); the whole story once, end to end, with two short
CLI runs of the tiny model in this process.
"""

import contextlib
import io
import json
import math
import statistics
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jax.numpy as jnp
import pytest
from conftest import run_cli_in_process
from nnxtrain.plugins.checkpointer import Checkpointer
from rich.console import Console
from test_checkpointer import HeldWrites

from nnxtrain import SetupEvent, StepEndEvent, TrainEndEvent
from nnxtrain import checkpoint as cio
from nnxtrain.config import Config

# -- storage: moving steps aside under Orbax's feet ---------------------------------------


def tiny_state(value: float) -> dict[str, Any]:
    return {"w": jnp.full((4,), value, jnp.float32)}


def test_move_aside_waits_for_the_write_in_flight_and_orbax_carries_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    directory = tmp_path / "checkpoints"
    mngr = cio.open_manager(str(directory), keep=3)
    held = HeldWrites(monkeypatch)  # step 1's write cannot finish until someone waits for it
    try:
        cio.save(mngr, 1, tiny_state(1.0), cio.make_meta(1, 0, {}, [], None))
        assert not held.gate.is_set()
        [moved] = cio.move_aside(mngr, [1], "diverged")
        assert moved == str(directory / "diverged" / "1")
        assert (directory / "diverged" / "1" / "meta").is_dir()
        assert mngr.all_steps() == [] and [p.name for p in directory.iterdir()] == ["diverged"]
        # The same step again: Orbax neither sees the moved one nor refuses to save it
        # anew, and a second move keeps both.
        cio.save(mngr, 1, tiny_state(2.0), cio.make_meta(1, 0, {}, [], None))
        mngr.wait_until_finished()
        assert mngr.all_steps() == [1]
        [again] = cio.move_aside(mngr, [1], "diverged")
        assert again.startswith(str(directory / "diverged" / "1.")), again
    finally:
        held.gate.set()  # a held write would otherwise keep the process from exiting
        mngr.close()
    # A moved step stays a checkpoint that load_from reads.
    source, steps = cio.open_source(moved)
    assert steps == [1]
    source.close()


class View:
    """Just enough of a TrainerView for the checkpointer's hooks: a tiny state, no model.
    `diverged_since` is what a guard marked; `resume_step` what the checkpointer noted."""

    def __init__(self) -> None:
        self.config, self.callbacks, self.dataset = Config(), [], None
        self.console = Console(file=io.StringIO(), width=400)
        self.goodput = SimpleNamespace(timed=lambda bucket: contextlib.nullcontext())
        self.state: Any = tiny_state(0.0)
        self.nonfinite_step: int | None = None
        self.diverged_since: int | None = None
        self.resume_step: int | None = -1  # never noted

    def consume_save_request(self) -> bool:
        return False

    def note_resume_step(self, step: int | None) -> None:
        self.resume_step = step


def saved_steps(directory: Path) -> list[int]:
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


@pytest.mark.parametrize(
    ("marks", "reason", "kept", "aside", "resume"),
    [
        # The guard marks step 4 as the start of a run of bad steps when it reads step 4,
        # before step 4's save: step 2 (the last before step 3's state) stays although
        # keep=2; the run fails and the checkpoints of steps 3 on go aside.
        ({4: 4}, "diverged: the guard gave up", [2], [5, 6], 2),
        # A non-finite loss at step 5, with no guard: the state of step 4 gave it (steps 5
        # and 6 are not saved at all).
        ({5: 5}, "not finite: loss=nan at step 5", [3], [4], 3),
        # A run of bad steps that ended (marked at 4, good again at 5): nothing is kept
        # beyond keep, nothing moves, and the run completed.
        ({4: 4, 5: None}, "completed", [5, 6], [], 6),
    ],
    ids=["diverged", "not-finite", "recovered"],
)
def test_the_checkpoints_after_a_divergence_go_aside_and_the_one_before_stays(
    tmp_path: Path, marks, reason, kept, aside, resume
):
    ck, view = Checkpointer(every=1, keep=2, if_busy="wait"), View()
    ck.name, view.callbacks = "checkpoint", [ck]
    ck.on_setup(view, SetupEvent(view.config, None, None, None, str(tmp_path), None))  # type: ignore[arg-type]
    for step in range(1, 7):
        view.state = tiny_state(float(step))
        view.diverged_since = marks.get(step, view.diverged_since)
        if reason.startswith("not finite"):  # the trainer's own finding: no saves after it
            view.nonfinite_step = view.diverged_since
        ck.on_step_end(view, StepEndEvent(step, 100, 0, None, lambda: None))  # type: ignore[arg-type]
    failed = reason.startswith(("diverged", "not finite"))
    since = view.diverged_since if failed else None
    ck.on_train_end(view, TrainEndEvent(6, reason, 1.0, since))
    ck.teardown(view)
    directory = tmp_path / "checkpoints"
    assert saved_steps(directory) == kept
    assert (saved_steps(directory / "diverged") if aside else []) == aside
    assert view.resume_step == resume
    if aside:
        assert f"a rerun resumes from step {resume} (" in view.console.file.getvalue()


# -- end to end: a real divergence, then a rerun with a sane learning rate ----------------

RUN = [
    "model=tiny",
    "run.batch_size=4",
    "run.seq_len=16",
    "run.eval_every=0",
    "run.log_every=1",  # every step's loss in metrics.jsonl
    "+callbacks.metrics.tensorboard=false",
    "callbacks.spike_guard.max_consecutive=3",
]
# The run, smaller: lr=300 blows the tiny model up within the guard's warm-up, with
# a save at every step (each waiting for the previous write, whatever the machine's speed).
DIVERGING = ["optim.lr=300", "callbacks.checkpoint.every=1", "callbacks.checkpoint.if_busy=wait"]
# The rerun: a sane learning rate, no warm-up (a few steps must show the loss falling), and
# only the final save.
SANE = ["optim.lr=1e-2", "optim.warmup_steps=0", "callbacks.checkpoint.every=0"]


def losses(run_dir: Path) -> dict[int, float]:
    """Each logged step's loss (NaN for a non-finite one, written as null or NaN)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: math.nan if r["loss"] is None else r["loss"] for r in rows if "loss" in r}


def test_a_diverged_run_leaves_a_way_back(tmp_path: Path):
    run_dir = tmp_path / "run"
    first = run_cli_in_process([*RUN, *DIVERGING, f"run.dir={run_dir}", "run.steps=20"], tmp_path)
    assert first.returncode == 3, first.stderr
    seen = losses(run_dir)
    # Where it began, from the losses alone: the first loss 10x above the median before it.
    began = next(
        s
        for s in sorted(seen)[1:]
        if seen[s] > 10 * statistics.median(seen[t] for t in seen if t < s)
    )
    checkpoints = run_dir / "checkpoints"
    kept, aside = saved_steps(checkpoints), saved_steps(checkpoints / "diverged")
    # The last checkpoint before the divergence is kept (keep=3 would have dropped it),
    # the later ones that keep=3 leaves are set aside.
    assert kept == [began - 2], (began, kept, aside)
    assert len(aside) == 3 and min(aside) >= began - 1, (began, kept, aside)
    last_line = first.stderr.strip().splitlines()[-1]
    assert last_line.startswith("nnxtrain: diverged: spike_guard skipped 3 steps in a row")
    assert last_line.endswith(f"; a rerun resumes from step {began - 2}"), last_line

    again = run_cli_in_process([*RUN, *SANE, f"run.dir={run_dir}", "run.steps=8"], tmp_path)
    assert again.returncode == 0, again.stderr
    assert f"resumed from step {began - 2} " in again.stdout
    trained = losses(run_dir)
    assert sorted(trained) == list(range(1, 9))  # cut back to the kept step, then 2-8 anew
    assert all(math.isfinite(v) for v in trained.values())
    first_loss = trained[began - 1]  # the state that was kept, before any update
    assert statistics.mean(trained[s] for s in (6, 7, 8)) < first_loss - 0.25, trained
    assert not (run_dir / "skipped_batches.jsonl").read_text()  # no skips left on record
