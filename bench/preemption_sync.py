"""Cost of the multi-process stop agreement: steps with it against steps without, one run.

Starts 2 processes x 1 CPU device on 127.0.0.1 (a free port) that train one Trainer run
together. A plugin switches `trainer.preemption.check_every` every `--block` steps, in
rounds of four blocks: no agreement, agreement every step, no agreement again (the
control: its ratio to the first is the measurement's noise), agreement every 10 steps
(the default `run.preempt_check_every`). A block's time runs from the completion of the
previous block's last step to that of its own (`StepRecord.completed_at`, read after the
run, so nothing waits early); the first round is warm-up. Prints, from process 0, each
mode's median seconds per step and its ratio to the median without agreement, and the
mean time of one exchange.

    python bench/preemption_sync.py [--rounds 40] [--block 10] [overrides ...]
"""

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

# Label -> check_every. A second block without agreement per round shows the noise floor.
MODES = {"none": 10**9, "every step": 1, "none again": 10**9, "every 10": 10}


def _child(args: argparse.Namespace, overrides: list[str]) -> None:
    from rich.console import Console

    from nnxtrain import Callback, StepRecord, Trainer, compose

    class Switch(Callback):
        """Sets check_every per block; keeps the records of the steps that end blocks."""

        def __init__(self) -> None:
            self.bounds: list[tuple[str, Callable[[], StepRecord], Callable[[], StepRecord]]] = []
            self.exchange: list[float] = []

        def on_train_start(self, trainer: Any, event: Any) -> None:
            agreed_stop = trainer.preemption.agreed_stop

            def timed(step: int) -> str | None:  # the loop's call, timed when it exchanges
                t, out = time.perf_counter(), agreed_stop(step)
                if trainer.preemption.check_every == 1:
                    self.exchange.append(time.perf_counter() - t)
                return out

            trainer.preemption.agreed_stop = timed
            self._set(trainer, 0)

        def _set(self, trainer: Any, step: int) -> None:
            self.mode = list(MODES)[(step // args.block) % len(MODES)]
            trainer.preemption.check_every = MODES[self.mode]

        def on_step_end(self, trainer: Any, event: Any) -> None:
            if event.step % args.block == 0:  # a block ends: it spans from the previous end
                if event.step > args.block:
                    self.bounds.append((self.mode, self.last, event.record))
                self.last = event.record
                self._set(trainer, event.step)

    steps = args.rounds * len(MODES) * args.block
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = compose(
            [
                "model=tiny",
                "run.batch_size=8",
                "run.seq_len=64",
                *overrides,
                f"run.steps={steps}",
                "run.eval_every=0",
                "run.host_devices=1",
                "callbacks=none",
                f"run.dir={run_dir}",
                f"mesh.coordinator=127.0.0.1:{args.port}",
                "mesh.num_processes=2",
                f"mesh.process_id={args.child}",
            ]
        )
        switch = Switch()
        Trainer(cfg, [switch], console=Console(quiet=True)).fit()
    if args.child:
        return
    per_step: dict[str, list[float]] = {m: [] for m in MODES}
    for i, (mode, first, last) in enumerate(switch.bounds):
        if i >= len(MODES) - 1:  # round 0 is warm-up (its first block has no start)
            span = last().completed_at - first().completed_at
            per_step[mode].append(span / (last().step - first().step))
    print(f"2 processes x 1 CPU device, {args.rounds - 1} rounds of {args.block}-step blocks")
    base = statistics.median(per_step["none"])
    for mode, values in per_step.items():
        med = statistics.median(values)
        print(f"agreement {mode:>10}: {med * 1e3:8.3f} ms/step (median)  ratio {med / base:.3f}")
    ex = switch.exchange
    print(f"one exchange (set, barrier, read, delete): {statistics.mean(ex) * 1e3:.3f} ms mean")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--block", type=int, default=10)
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args()
    if args.child is not None:
        _child(args, overrides)
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, *sys.argv[1:], "--child", str(i), "--port", str(port)],
            env=env,
            stdout=None if i == 0 else subprocess.DEVNULL,
        )
        for i in range(2)
    ]
    codes = [p.wait() for p in procs]
    if any(codes):
        sys.exit(f"a process failed: exit codes {codes}")


if __name__ == "__main__":
    main()
