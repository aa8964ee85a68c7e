"""What `Trainer.fit()` returns: `FitResult`, and the result of a run with nothing to do.

result = Trainer(config).fit()
result.reason, result.metrics["loss"], result.tokens_per_sec
"""

from dataclasses import dataclass

from rich.console import Console

from nnxtrain.run.directory import final_record
from nnxtrain.train.step import TrainState


@dataclass(frozen=True)
class FitResult:
    """What `Trainer.fit()` returns. `reason`: completed | stopped: ... | preempted: SIG |
    not finite: ... | diverged: ... | dry run | nothing to do (a state restored at
    run.steps)."""

    state: TrainState | None  # final state (None after a dry run)
    step: int  # steps done
    reason: str  # why fit() returned (above)
    metrics: dict[str, float]  # the last step's metrics
    eval_metrics: dict[str, float]  # the last evaluation's metrics (empty if none)
    run_dir: str
    seconds: float = 0.0  # wall time of the loop
    best_eval_loss: float | None = None  # lowest eval/loss of the run (None without eval)
    # The steps tokens/s is timed over: every step this fit() trained but its first, whose
    # time holds the one-time start of the compiled program. `timed_tokens`: their
    # non-padding tokens; `timed_seconds`: the device's time on them
    # (`nnxtrain.train.timing`), each from when it could start (dispatched, the step
    # before it done) to its completion: compilation, evaluation, saves and the device
    # waiting for the host are not in it.
    timed_tokens: int = 0
    timed_seconds: float = 0.0
    # The step a rerun of this run dir resumes from, as the checkpointer says at the end
    # (0: from the start); None without a checkpointer. The CLI names it when a run fails.
    resume_step: int | None = None

    @property
    def tokens_per_sec(self) -> float | None:
        """Non-padding tokens per second of the train steps (None: fewer than 2 steps)."""
        return self.timed_tokens / self.timed_seconds if self.timed_seconds > 0 else None


def nothing_to_do(
    run_dir: str, step: int, steps: int, state: TrainState | None, console: Console
) -> FitResult:
    """The result of a run restored at a `step` >= run.steps: nothing is trained or written,
    and the records of the run that trained there (config.yaml, run_info.json, metrics)
    stay as they are; its final metrics come from run_info.json."""
    console.print(
        f"nothing to do: {run_dir} already holds step {step} (run.steps={steps}); "
        "raise run.steps to train further"
    )
    final = final_record(run_dir, step)
    return FitResult(
        state,
        step,
        "nothing to do",
        final.get("metrics", {}),
        final.get("eval_metrics", {}),
        run_dir,
        best_eval_loss=final.get("best_eval_loss"),
    )
