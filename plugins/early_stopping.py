"""Early stopping: ends the run when a monitored metric has stopped improving.

    nnxtrain +callbacks.es._target_=early_stopping                 # eval/loss, patience 3
    nnxtrain +callbacks.es._target_=early_stopping +callbacks.es.monitor=loss  # train loss

`monitor` names an evaluation metric (`eval/loss`, `eval/lm_loss`, `eval/perplexity`),
checked after every evaluation (`run.eval_every` must then be > 0), or a train metric
(`loss`, `lm_loss`, `perplexity`, `grad_norm`, ...), checked every `check_every` steps. A
check improves on the best value so far when it is lower (`mode: min`) or higher
(`mode: max`) by more than `min_delta`; after `patience` checks in a row without an
improvement it calls `trainer.request_stop` with a reason that names the metric, its best
value and the step of the best. Reading a train metric waits for that step only, so the
host runs ahead between checks. The best value, its step and the count of checks without
improvement are its `state_dict()`, so a resumed run picks up where it was. Uses only the
public plugin API.
"""

import math
from typing import Any

from nnxtrain import (
    METRIC_NAMES,
    Callback,
    ConfigError,
    EvalEndEvent,
    SetupEvent,
    StepEndEvent,
    TrainerView,
    check_int,
)

# An evaluation reports the train step's loss metrics; it takes no update (no grad_norm, lr).
EVAL_METRICS = tuple(f"eval/{k}" for k in METRIC_NAMES if k not in ("grad_norm", "lr", "skipped"))


class EarlyStopping(Callback):
    """Stops the run when a metric has not improved for `patience` checks in a row."""

    def __init__(
        self,
        monitor: str = "eval/loss",
        mode: str = "min",
        patience: int = 3,
        min_delta: float = 0.0,
        check_every: int = 10,
    ):
        self.monitor, self.mode, self.patience = monitor, mode, patience
        self.min_delta, self.check_every = min_delta, check_every
        self.best: float | None = None  # best value seen so far
        self.best_step = 0  # the step at which it was seen
        self.bad_checks = 0  # checks in a row without an improvement

    def on_setup(self, trainer: TrainerView, event: SetupEvent) -> None:
        key = f"callbacks.{self.name}"
        known = EVAL_METRICS + METRIC_NAMES
        if self.monitor not in known:
            raise ConfigError(
                f"{key}.monitor",
                f"unknown metric {self.monitor!r}",
                f"use one of {', '.join(known)}",
            )
        if self.mode not in ("min", "max"):
            raise ConfigError(
                f"{key}.mode",
                f"must be min or max, got {self.mode!r}",
                f"set {key}.mode=min (lower is better) or {key}.mode=max",
            )
        for opt in ("patience", "check_every"):
            check_int(f"{key}.{opt}", getattr(self, opt), 1, f"set {key}.{opt}=1")
        if isinstance(self.min_delta, bool) or not (
            isinstance(self.min_delta, int | float) and self.min_delta >= 0
        ):
            raise ConfigError(
                f"{key}.min_delta",
                f"must be a number >= 0, got {self.min_delta!r}",
                f"set {key}.min_delta=0",
            )
        if self.monitor in EVAL_METRICS and not event.config.run.eval_every:
            raise ConfigError(
                f"{key}.monitor",
                f"{self.monitor} is never computed because run.eval_every=0",
                f"set run.eval_every > 0, or monitor a train metric such as {key}.monitor=loss",
            )

    def on_step_end(self, trainer: TrainerView, event: StepEndEvent) -> None:
        if self.monitor in METRIC_NAMES and event.step % self.check_every == 0:
            self._check(trainer, event.metrics[self.monitor], event.step)  # waits for this step

    def on_eval_end(self, trainer: TrainerView, event: EvalEndEvent) -> None:
        if self.monitor in EVAL_METRICS:
            self._check(trainer, event.metrics[self.monitor], event.step)

    def _check(self, trainer: TrainerView, value: float, step: int) -> None:
        value = float(value)
        if self._improves(value):
            self.best, self.best_step, self.bad_checks = value, step, 0
            return
        self.bad_checks += 1
        if self.bad_checks >= self.patience:
            best = "none" if self.best is None else f"{self.best:.6g}"
            trainer.request_stop(
                f"early stopping: {self.monitor} did not improve by more than "
                f"{self.min_delta:g} for {self.bad_checks} checks (best {best} at step "
                f"{self.best_step}, now {value:.6g} at step {step})"
            )

    def _improves(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if self.best is None:
            return True
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step, "bad_checks": self.bad_checks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = state["best"]
        self.best_step = int(state["best_step"])
        self.bad_checks = int(state["bad_checks"])
