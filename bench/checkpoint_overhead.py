"""Checkpoint overhead: the same training with async saves every 5 steps and without saves.

Both runs use the default model through `nnxtrain.config.compose` + `Trainer`, in one
process, interleaved (no saves, saves, no saves, saves, ...), each in a fresh run dir.
A run's time is its loop, from `on_train_start` to the end of `on_train_end`, so the
saving run also pays its final save and the wait for that write. Prints the ratio of the
median totals (target <= 1.10) and the slowest step next to a save (the save's step or
the one after, whose dispatch the save delayed) relative to the median step of the runs
without saves, from `StepRecord.seconds` (time between step completions).

    python bench/checkpoint_overhead.py [--steps 60] [--reps 3] [--every 5] [overrides ...]
"""

import argparse
import io
import re
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
from nnxtrain.plugins.checkpointer import Checkpointer
from rich.console import Console

from nnxtrain import Callback, StepRecord, Trainer, compose


class _Clock(Callback):
    """Loop time and every step's record (resolved at the end, so nothing waits early)."""

    def __init__(self) -> None:
        self.records: list[Callable[[], StepRecord]] = []
        self.saved: list[int] = []  # steps the checkpointer wrote (from its console lines)

    def on_train_start(self, trainer: Any, event: Any) -> None:
        self.t0 = time.perf_counter()

    def on_step_end(self, trainer: Any, event: Any) -> None:
        self.records.append(event.record)

    def on_train_end(self, trainer: Any, event: Any) -> None:
        self.seconds = time.perf_counter() - self.t0
        self.steps = {r().step: r().seconds for r in self.records}


def run(overrides: list[str], run_dir: str, every: int) -> tuple[_Clock, str]:
    """One training run; the clock is the last callback, so it sees the final save's wait."""
    cfg = compose([*overrides, f"run.dir={run_dir}", "run.eval_every=0", "callbacks=none"])
    clock, out = _Clock(), io.StringIO()
    callbacks: list[Callback] = [Checkpointer(every=every)] if every else []
    Trainer(cfg, [*callbacks, clock], console=Console(file=out, width=300)).fit()
    return clock, out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    overrides = [*args.overrides, f"run.steps={args.steps}"]
    plain: list[_Clock] = []
    saving: list[_Clock] = []
    written = skipped = 0
    with tempfile.TemporaryDirectory() as tmp:
        run(overrides, f"{tmp}/warmup", 0)  # compile (or fill the cache) outside the timing
        for rep in range(args.reps):
            plain.append(run(overrides, f"{tmp}/plain{rep}", 0)[0])
            clock, text = run(overrides, f"{tmp}/saving{rep}", args.every)
            clock.saved = [int(x) for x in re.findall(r"checkpoint: saved step (\d+)", text)]
            saving.append(clock)
            written += len(clock.saved)
            skipped += text.count("checkpoint: warning: skipped")
    cfg = compose(overrides)
    p = statistics.median(c.seconds for c in plain)
    s = statistics.median(c.seconds for c in saving)
    median_step = statistics.median(x for c in plain for x in c.steps.values())
    near_save = [c.steps[k] for c in saving for n in c.saved for k in (n, n + 1) if k in c.steps]
    print(
        f"\nmodel {cfg.model.name}, batch {cfg.run.batch_size} x {cfg.run.seq_len}, "
        f"{args.steps} steps x {args.reps} reps, backend {jax.default_backend()}, "
        f"async saves every {args.every} steps ({written} written, {skipped} skipped)"
    )
    for label, clocks, median in (("no saves", plain, p), ("saves", saving, s)):
        reps = ", ".join(f"{c.seconds:.2f}" for c in clocks)
        print(f"{label:9s}: {median:7.3f} s per run  (reps: {reps})")
    print(f"ratio saves/no saves: {s / p:.3f}  (target <= 1.10)")
    print(
        f"slowest step next to a save: {max(near_save) * 1e3:.1f} ms = "
        f"{max(near_save) / median_step:.2f} x the median step ({median_step * 1e3:.1f} ms)"
    )


if __name__ == "__main__":
    main()
