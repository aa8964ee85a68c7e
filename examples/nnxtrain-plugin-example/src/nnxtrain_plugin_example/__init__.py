"""An example nnxtrain plugin: writes `<run_dir>/<filename>` with a summary of the run.

    pip install ./examples/nnxtrain-plugin-example
    nnxtrain +callbacks.summary._target_=run_summary +callbacks.summary.filename=s.json

The summary holds the steps done, why the run ended, the loss at the end and the lowest
evaluation loss seen (with its step). The lowest evaluation loss is this plugin's state:
with the checkpointer on, it survives a kill and a resume.
"""

import json
import os
from typing import Any

from nnxtrain import Callback, EvalEndEvent, SetupEvent, StepEndEvent, TrainEndEvent, TrainerView


class RunSummary(Callback):
    """Writes a JSON summary of the run (steps, end reason, losses) into the run directory."""

    def __init__(self, filename: str = "summary.json"):
        self.filename = filename
        self.best_eval: float | None = None
        self.best_eval_step: int | None = None
        self.path = ""
        self._last_step: StepEndEvent | None = None

    def on_setup(self, trainer: TrainerView, event: SetupEvent) -> None:
        self.path = os.path.join(event.run_dir, self.filename)

    def on_step_end(self, trainer: TrainerView, event: StepEndEvent) -> None:
        self._last_step = event  # kept, not read: reading metrics would wait for the device

    def on_eval_end(self, trainer: TrainerView, event: EvalEndEvent) -> None:
        loss = event.metrics["eval/loss"]
        if self.best_eval is None or loss < self.best_eval:
            self.best_eval, self.best_eval_step = loss, event.step

    def on_train_end(self, trainer: TrainerView, event: TrainEndEvent) -> None:
        summary = {
            "plugin": self.name,
            "step": event.step,
            "reason": event.reason,
            "loss": self._last_step.metrics["loss"] if self._last_step else None,
            "best_eval_loss": self.best_eval,
            "best_eval_step": self.best_eval_step,
        }
        with open(self.path, "w") as f:
            json.dump(summary, f, indent=2)
        trainer.console.print(f"{self.name}: wrote {self.path}")

    def state_dict(self) -> dict[str, Any]:
        return {"best_eval": self.best_eval, "best_eval_step": self.best_eval_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_eval, self.best_eval_step = state["best_eval"], state["best_eval_step"]
