"""Metrics logger: a console line per logged step, metrics.jsonl, TensorBoard, a progress bar.

Every `log_every` steps (and on the last) it prints, for the steps since the previous
line: step, seconds per step, TFLOP/s and tokens/s per device (non-padding tokens; the
FLOPs count whole rows), total weights (unmasked target tokens), loss, lm_loss,
perplexity, learning rate and gradient norm (a mixture of experts also its load-balancing
loss and expert load, and every `MOE_METRIC_NAMES` metric in the record). The same
record goes to `<run_dir>/metrics.jsonl`, and to TensorBoard when tensorboardX is
installed. On a terminal a rich progress bar runs below the lines. A step (or evaluation)
whose total weights are 0 had no token to take a loss over: its loss, lm_loss, z_loss and
perplexity are `n/a` on the console, null in metrics.jsonl and left out of TensorBoard
(the step's metrics hold 0 and 1 there, which are no measurement).

Seconds are true device time: measured between step completions (see `nnxtrain.train.timing`),
averaged over the window since the previous line. A window more than 1.5x away from the
run's median so far carries a `note` saying why (the margin allows for the median still
moving). It waits on the device only at the steps it logs. Uses only the public plugin API.

The records stay true across resumes: in `on_train_start`, once the state is restored,
the records of steps after the restored one are dropped from metrics.jsonl (the resumed run
logs those steps again), and so is a line a kill tore in half; TensorBoard is told to hide
its events of those steps (`purge_step`). A fresh run (step 0) thus starts from an empty
metrics.jsonl: whatever the run dir held came from steps this run redoes. Only process 0
writes.
"""

import os
import statistics
import time
from collections.abc import Callable
from typing import IO, Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from nnxtrain import (
    Callback,
    EvalEndEvent,
    SetupEvent,
    StepEndEvent,
    StepRecord,
    TrainEndEvent,
    TrainerView,
    TrainStartEvent,
    UserError,
    check_int,
    drop_records_after,
    json_line,
    without_loss,
)

METRICS_FILE = "metrics.jsonl"


def _fixed(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


class MetricsLogger(Callback):
    """Logs step metrics to the console, metrics.jsonl and (optionally) TensorBoard."""

    def __init__(
        self,
        log_every: int = 10,
        jsonl: bool = True,
        tensorboard: bool = True,
        progress: bool = True,
    ):
        self.log_every, self.use_jsonl, self.use_tb = log_every, jsonl, tensorboard
        self.use_progress = progress
        self.run_dir = ""
        self._file: IO[str] | None = None
        self._tb: Any = None
        self._progress: Progress | None = None
        self._task: Any = None
        self._window: list[Callable[[], StepRecord]] = []
        self._window_tokens = 0  # non-padding tokens of the window's steps
        self._last_completed: float | None = None
        self._window_seconds: list[float] = []

    def on_setup(self, trainer: TrainerView, event: SetupEvent) -> None:
        every, key = self.log_every, f"callbacks.{self.name}.log_every"
        # (from a config the type is checked before; this is for a logger built in Python)
        check_int(key, every, 1, f"set {key}=10")
        self.flops = event.flops
        self.run_dir = event.run_dir

    def on_train_start(self, trainer: TrainerView, event: TrainStartEvent) -> None:
        # The files are opened here, not in on_setup: only now is the restored step known
        # (the checkpointer restores in on_setup), and a dry run never gets here.
        if not trainer.console.quiet and self.use_jsonl:
            self._file = self._open_jsonl(trainer, event.step)
        if not trainer.console.quiet and self.use_tb:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                trainer.console.print(
                    "tensorboardX is not installed: TensorBoard logging off "
                    "(pip install 'nnxtrain[tensorboard]')",
                    markup=False,  # [tensorboard] is text, not a rich style
                )
            else:
                # TensorBoard hides the events at steps >= purge_step of earlier files.
                self._tb = SummaryWriter(
                    os.path.join(self.run_dir, "tensorboard"), purge_step=event.step + 1
                )
        if self.use_progress and trainer.console.is_terminal and not trainer.console.quiet:
            self._progress = Progress(
                TextColumn("training"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                console=trainer.console,
                transient=True,
            )
            self._task = self._progress.add_task(
                "train", total=event.num_steps, completed=event.step
            )
            self._progress.start()

    def on_step_end(self, trainer: TrainerView, event: StepEndEvent) -> None:
        self._window.append(event.record)  # a callable: nothing waits here
        self._window_tokens += event.tokens
        if self._progress is not None:
            self._progress.update(self._task, completed=event.step)
        if event.step % self.log_every and event.step != event.num_steps:
            return
        records = [get() for get in self._window]  # the last one waits for this step
        tokens, self._window, self._window_tokens = self._window_tokens, [], 0
        last = records[-1]
        start = (
            self._last_completed if self._last_completed is not None else (records[0].dispatched_at)
        )
        seconds = (last.completed_at - start) / len(records)
        note = self._note(seconds, records, first=self._last_completed is None)
        self._last_completed = last.completed_at
        self._window_seconds.append(seconds)
        m = without_loss(last.metrics)
        devices = self.flops.num_devices
        record: dict[str, Any] = {
            "step": event.step,
            "seconds": seconds,
            "tflops_per_sec_per_device": self.flops.tflops_per_step_per_device / seconds,
            # packed rows differ in padding: the window's own non-padding tokens per step
            "tokens_per_sec_per_device": tokens / len(records) / devices / seconds,
            **m,  # every scalar of the step (DPO's and the routers' too)
            "goodput": trainer.goodput.report().goodput,
            "time": time.time(),
        }
        if note:
            record["note"] = note
        trainer.console.print(
            f"step {event.step}/{event.num_steps} | {seconds:.4f} s | "
            f"{record['tflops_per_sec_per_device']:.4g} TFLOP/s/dev | "
            f"{record['tokens_per_sec_per_device']:,.0f} tok/s/dev | weights "
            f"{m['total_weights']:,.0f} | loss {_fixed(m['loss'], 4)} | lm_loss "
            f"{_fixed(m['lm_loss'], 4)} | ppl {_fixed(m['perplexity'], 3)} | lr {m['lr']:.3e} | "
            f"grad_norm {m['grad_norm']:.3f} | {_dpo(m)}{_moe(m)}"
            f"goodput {100 * record['goodput']:.1f}%" + (f" | note: {note}" if note else ""),
            markup=False,
            highlight=False,
        )
        self._write(record)

    def _open_jsonl(self, trainer: TrainerView, step: int) -> IO[str]:
        """metrics.jsonl for appending, once the records after `step` are dropped."""
        path = os.path.join(self.run_dir, METRICS_FILE)
        try:
            dropped = drop_records_after(path, step)
            file = open(path, "a")  # noqa: SIM115
        except OSError as e:
            raise UserError(
                f"{path}: cannot keep its records true to step {step} ({e.strerror or e}; "
                f"the file is whole). Fix: free space or make the run dir writable, or "
                f"set callbacks.{self.name}.jsonl=false"
            ) from e
        if dropped:
            trainer.console.print(
                f"metrics: dropped {dropped} record(s) after step {step} from {path} "
                "(this run logs those steps again)",
                markup=False,
                highlight=False,
            )
        return file

    def _note(self, seconds: float, records: list[StepRecord], first: bool) -> str:
        """Why this window's step time is far from the run's median so far ('' if it isn't)."""
        reasons = []
        if first:
            reasons.append("includes the first step (warm-up)")
        gap = sum(r.host_gap for r in records)
        if gap > 0.25 * seconds * len(records):
            reasons.append(f"device waited {gap:.3f} s for the host (eval, saves, callbacks)")
        # The run's final median is not known yet: compare with the median so far (without
        # the warm-up window once there are others) with a margin, 1.5x rather than 2x, so
        # that a step far from the final median still carries its note when the median drifts.
        history = self._window_seconds[1:] or self._window_seconds
        if history and not reasons:
            median = statistics.median(history)
            if seconds > 1.5 * median or seconds < median / 1.5:
                reasons.append(
                    f"{seconds / median:.2f}x the median step time so far (machine load or noise)"
                )
        return "; ".join(reasons)

    def on_eval_end(self, trainer: TrainerView, event: EvalEndEvent) -> None:
        m = without_loss(event.metrics, "eval/")
        trainer.console.print(
            f"eval at step {event.step} | {event.num_batches} batches in {event.seconds:.2f} s"
            f" | loss {_fixed(m['eval/loss'], 4)} | ppl {_fixed(m['eval/perplexity'], 3)}",
            markup=False,
            highlight=False,
        )
        self._write({"step": event.step, **m, "time": time.time()})

    def _write(self, record: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json_line(record))
            self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key not in ("step", "time", "note") and value is not None:
                    self._tb.add_scalar(
                        key if "/" in key else f"train/{key}", value, record["step"]
                    )

    def on_train_end(self, trainer: TrainerView, event: TrainEndEvent) -> None:
        self._close()

    def teardown(self, trainer: TrainerView) -> None:
        self._close()

    def _close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _dpo(m: dict[str, Any]) -> str:
    """A DPO step's reward accuracy and margin for the console line ("" for others)."""
    if "rewards/accuracies" not in m:
        return ""
    return f"rewards acc {m['rewards/accuracies']:.3f} margin {m['rewards/margins']:.4f} | "


def _moe(m: dict[str, Any]) -> str:
    """A mixture of experts' load-balancing loss and expert loads for the console line."""
    if "moe_aux_loss" not in m:
        return ""
    load = f"load {m['moe_load_min']:.2f}..{m['moe_load_max']:.2f}"
    return f"moe_aux {m['moe_aux_loss']:.4f} | {load} | "
