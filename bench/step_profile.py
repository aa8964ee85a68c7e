"""Where the train step's time goes on CPU: a jax.profiler trace of Trainer.fit(), with the
time of XLA's thunks summed by kind per step.

    python -m bench.step_profile [--steps 20] [--skip 5] [--char] [overrides ...]

`--char` profiles the char model of `bench.cpu_suite`; overrides apply on top.

Kinds: matmuls (`dot` and YNNPACK fusions, which also run some reductions), collectives
(all-gather, all-reduce, ...: their time includes waiting for the other devices to
arrive), and everything else (elementwise fusions, copies, transposes). Per XLA worker
thread, the busy time is the sum of its thunks; the rest of the step is idle. Read it with
the machine's load in mind (`uptime`): a preempted thunk looks slow.
"""

import argparse
import collections
import glob
import re
import statistics
import tempfile
from typing import Any

import jax

from bench.cpu_suite import CHAR_MODEL
from nnxtrain import Callback, StepEndEvent, Trainer, compose

_THUNK = re.compile(r"^[a-z][a-z0-9_\-]*(\.\d+)?$")  # HLO instruction names: ynn_fusion.12
_COLLECTIVE = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


def kind(name: str) -> str:
    if name.startswith(_COLLECTIVE):
        return "collectives (incl. waiting)"
    if name.startswith(("dot", "ynn_fusion", "convolution")):
        return "matmuls (dot, YNNPACK)"
    return "elementwise, copies"


class _Trace(Callback):
    """Traces steps skip+1 .. skip+steps (from dispatch to dispatch) into `folder`."""

    def __init__(self, folder: str, skip: int, steps: int):
        self.folder, self.skip, self.steps = folder, skip, steps
        self.records: list[Any] = []

    def on_step_end(self, trainer: Trainer, event: StepEndEvent) -> None:
        if event.step == self.skip:
            jax.block_until_ready(trainer.state)  # start from idle devices
            jax.profiler.start_trace(self.folder)
        elif event.step > self.skip:
            self.records.append(event.record)
        if event.step == self.skip + self.steps:
            jax.block_until_ready(trainer.state)
            jax.profiler.stop_trace()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--skip", type=int, default=5)
    parser.add_argument("--char", action="store_true", help="the char model of the CPU suite")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose(
            [
                *(CHAR_MODEL if args.char else []),
                *args.overrides,
                f"run.steps={args.skip + args.steps}",
                f"run.dir={tmp}/run",
                "run.eval_every=0",
                "callbacks=none",
            ]
        )
        trace = _Trace(f"{tmp}/trace", args.skip, args.steps)
        trainer = Trainer(cfg, [trace])
        trainer.fit()
        step_ms = statistics.median(r().seconds for r in trace.records) * 1e3
        (path,) = glob.glob(f"{tmp}/trace/**/*.xplane.pb", recursive=True)
        profile = jax.profiler.ProfileData.from_file(path)
    print(f"\nmedian true step {step_ms:.1f} ms on {trainer.mesh.size} device(s); per step:")
    for plane in profile.planes:
        for line in plane.lines:
            if "XLAEigen" not in line.name:  # XLA's CPU worker threads
                continue
            by_kind: collections.Counter[str] = collections.Counter()
            for event in line.events:
                if _THUNK.match(event.name):
                    by_kind[kind(event.name)] += event.duration_ns / 1e6 / args.steps
            busy = sum(by_kind.values())
            parts = ", ".join(f"{k} {v:.1f} ms" for k, v in by_kind.most_common())
            print(f"  thread {line.name[-6:]}: busy {busy:.1f} ms ({parts})")


if __name__ == "__main__":
    main()
