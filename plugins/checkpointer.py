"""Async checkpointer: saves with Orbax in the background, resumes a rerun where it stopped.

    nnxtrain run.dir=runs/a                          # saves every 100 steps, keeps 3
    nnxtrain run.dir=runs/a                          # rerun after a kill: resumes
    nnxtrain run.dir=runs/b callbacks.checkpoint.load_from=runs/a   # new run, a's state

Saves every `every` steps, on `trainer.request_save()`, and at the end (also on SIGTERM/
SIGINT; not after a non-finite loss or a divergence), waiting for that last write before
returning. A run that ends as failed sets the checkpoints saved after its divergence began
(`event.diverged_since`) aside into `<directory>/diverged/`, so a rerun resumes from the
last one before it, which is kept whatever `keep` says while a spike guard sees a run of
bad steps (`trainer.diverged_since`); the CLI's exit line names that step. A save
blocks the loop for the device-to-host copy only; `if_busy` decides what happens when a
save is due while the previous write still runs (`skip` with a warning, or `wait`). At
setup it checks that `directory` can be written (not at the first save, after training),
then restores the latest complete checkpoint onto the current mesh, or starts from
`load_from` (a whole state; weights alone come with `run.init_from`). docs/checkpointing.md
is the manual; `nnxtrain.checkpoint` owns the format on disk, this plugin decides when to
save and restore. Uses only the public API of `nnxtrain`.
"""

import dataclasses
import os
import time
from typing import Any

from nnxtrain import (
    Callback,
    ConfigError,
    RunLock,
    SetupEvent,
    StepEndEvent,
    TrainEndEvent,
    TrainerView,
    TrainStartEvent,
    all_finite,
)
from nnxtrain import checkpoint as cio

DIVERGED = "diverged"  # <directory>/diverged/<step>: the checkpoints set aside by a divergence


class Checkpointer(Callback):
    """Saves the train state asynchronously with Orbax and restores it on a rerun."""

    def __init__(
        self,
        directory: str | None = None,
        every: int = 100,
        keep: int = 3,
        keep_every: int = 0,
        if_busy: str = "skip",
        load_from: str | None = None,
        load_params_only: bool = False,
        fallback: bool = False,
    ):
        self.directory, self.every, self.keep, self.keep_every = directory, every, keep, keep_every
        self.if_busy, self.load_from, self.load_params_only = if_busy, load_from, load_params_only
        self.fallback = fallback
        self._mngr: Any = None
        self._pending: tuple[int, float, float, float] | None = None  # step, t0, blocked, waited
        self._written_at: float | None = None  # set by Orbax's thread when a write completes
        self._deferred = False  # a requested save waits for the writer to be free
        self._last_step = -1
        self._pinned: set[int] = set()  # kept whatever `keep` says (_pin)
        self._lock = RunLock()  # on `directory`, unless it is the run dir

    # -- restore -------------------------------------------------------------------------

    def on_setup(self, trainer: TrainerView, event: SetupEvent) -> None:
        opts = {k: v for k, v in vars(self).items() if not k.startswith("_") and k != "name"}
        cio.check_options(f"callbacks.{self.name}", opts)
        if event.config.run.dry_run:
            return  # nothing is allocated, restored or saved
        self._config = cio.jsonable(dataclasses.asdict(event.config))
        self.path = self._path(event)
        _one_saver_per_directory(self, trainer, event)
        key = f"callbacks.{self.name}.directory"
        cio.check_directory(key, self.path)
        # Locked wherever it lies (another run may name it), unless it is the locked run dir.
        if os.path.realpath(self.path) != os.path.realpath(event.run_dir):
            self._lock.take(self.path, event.config.mesh.init_timeout, key)
        partial = cio.partial_saves(self.path)
        if partial:
            self._say(
                trainer,
                f"warning: ignoring {len(partial)} unfinished save(s) in "
                f"{self.path} (the process was killed while writing): {', '.join(partial)}",
            )
        self._mngr = cio.open_manager(
            self.path,
            keep=self.keep,
            keep_every=self.keep_every,
            keep_also=lambda: self._pinned,
            on_written=self._on_written,
        )
        if self._mngr.all_steps():
            if self.load_from:
                self._say(
                    trainer,
                    f"{self.path} has checkpoints: resuming from them, not "
                    f"from load_from={self.load_from}",
                )
            self._restore(trainer, self._mngr, "resumed from")
        elif self.load_from:
            source, steps = cio.open_source(self.load_from)
            if not steps:
                raise ConfigError(
                    f"callbacks.{self.name}.load_from",
                    f"no complete checkpoint at {self.load_from}",
                    "give a run dir, its checkpoints/ dir or one checkpoints/<step> dir",
                )
            self._restore(trainer, source, "started from", steps)
            source.close()

    def _path(self, event: SetupEvent) -> str:
        return os.path.join(event.run_dir, self.directory or "checkpoints")

    def _restore(self, trainer: TrainerView, mngr: Any, verb: str, steps: Any = None) -> None:
        with trainer.goodput.timed("restore"):
            self._read(trainer, mngr, verb, steps)

    def _read(self, trainer: TrainerView, mngr: Any, verb: str, steps: Any) -> None:
        t0 = time.perf_counter()
        step, state, meta, diff = cio.restore_latest(
            mngr,
            mngr.all_steps() if steps is None else steps,
            trainer.abstract_state,
            self._config,
            fallback=self.fallback,
            key=f"callbacks.{self.name}.fallback",
            warn=lambda text: self._say(trainer, f"warning: {text}"),
        )
        where = os.path.join(str(mngr.directory), str(step))
        unreadable = [s for s in mngr.all_steps() if s > step and mngr is self._mngr]
        if unreadable:
            moved = cio.set_aside(mngr, unreadable)
            self._say(trainer, f"moved the unreadable checkpoint(s) aside: {', '.join(moved)}")
        self._say(trainer, f"{verb} step {step} ({where}) in {time.perf_counter() - t0:.2f} s")
        if diff:
            self._say(trainer, f"note: config differs from the checkpoint's: {'; '.join(diff)}")
        trainer.state = state
        self._last_step = step
        self._base = (meta.get("lora_base"), where)  # LoRA: checked once the base is built
        saved = meta.get("callbacks", {})
        for cb in trainer.callbacks:
            if cb.name in saved:
                cb.load_state_dict(saved[cb.name])
        if meta.get("dataset") is not None and hasattr(trainer.dataset, "load_state_dict"):
            trainer.dataset.load_state_dict(meta["dataset"])

    def on_train_start(self, trainer: TrainerView, event: TrainStartEvent) -> None:
        if getattr(self, "_base", None) is not None:  # restored LoRA adapters: on their base?
            cio.check_base(*self._base, getattr(trainer.state, "params", None), self._config)

    # -- save ----------------------------------------------------------------------------

    def on_step_end(self, trainer: TrainerView, event: StepEndEvent) -> None:
        self._report(trainer)
        due = self.every > 0 and event.step % self.every == 0
        requested = trainer.consume_save_request() or self._deferred
        if not (due or requested) or event.step == event.num_steps:
            return  # (the last step is saved by on_train_end)
        if self.if_busy == "skip" and cio.saving(self._mngr):
            self._deferred = requested  # saved as soon as the writer is free
            if due and self._pending is not None:
                self._say(
                    trainer,
                    f"warning: skipped the save at step {event.step}: the write of step "
                    f"{self._pending[0]} is still running (if_busy=skip; set "
                    f"callbacks.{self.name}.if_busy=wait to wait, or save less often)",
                )
            return
        self._deferred = False
        event.record()  # this step's (and so every earlier step's) loss reached the host
        self._save(trainer, event.step)

    def on_train_end(self, trainer: TrainerView, event: TrainEndEvent) -> None:
        if self._mngr is None:
            return  # a dry run: nothing was restored or saved
        since = event.diverged_since
        if event.reason.startswith("not finite"):
            self._say(trainer, f"no final save: the state is not finite ({event.reason})")
        elif since is not None:
            self._say(trainer, f"no final save: the run diverged from step {since}")
        elif trainer.state is not None and event.step > self._last_step and event.step > 0:
            self._save(trainer, event.step)
        self._finish(trainer)
        if since is not None:
            self._set_aside_diverged(trainer, since)
        latest = self._mngr.latest_step()
        trainer.note_resume_step(latest if latest is not None else None if self.load_from else 0)

    def _set_aside_diverged(self, trainer: TrainerView, since: int) -> None:
        """Moves the checkpoints saved after the divergence began aside: step `since`'s bad
        loss was computed on the state after step `since - 1`, so that checkpoint and every
        later one hold a state that already gave a bad loss."""
        after = [s for s in self._mngr.all_steps() if s >= since - 1]
        if after:
            cio.move_aside(self._mngr, after, DIVERGED)  # waits for writes in flight
            self._say(
                trainer,
                f"the run diverged from step {since} (its loss, on the state of step "
                f"{since - 1}, was the first bad one): moved the checkpoint(s) of step(s) "
                f"{', '.join(map(str, after))} to {os.path.join(self.path, DIVERGED)}/",
            )
        latest = self._mngr.latest_step()
        self._say(
            trainer,
            f"a rerun resumes from step {latest} ({os.path.join(self.path, str(latest))})"
            if latest is not None
            else "no checkpoint is left: a rerun starts from "
            + (f"load_from={self.load_from}" if self.load_from else "step 0"),
        )

    def _pin(self, trainer: TrainerView) -> None:
        """While the run may be diverging (a guard marked a run of bad steps), keeps the
        last checkpoint from before it, whatever `keep` says; read by Orbax's collection
        of old steps during `cio.save`."""
        since = trainer.diverged_since
        before = [s for s in self._mngr.all_steps() if since is not None and s < since - 1]
        self._pinned = {max(before)} if before else set()

    def teardown(self, trainer: TrainerView) -> None:
        self._finish(trainer)
        if self._mngr is not None:
            self._mngr.close()
        self._mngr = None
        self._lock.release()

    def _save(self, trainer: TrainerView, step: int) -> None:
        with trainer.goodput.timed("checkpoint"):  # the time the loop is held
            self._start_save(trainer, step)

    def _start_save(self, trainer: TrainerView, step: int) -> None:
        if not self._finite(trainer, step):
            return
        t0 = time.perf_counter()
        self._mngr.wait_until_finished()  # no-op unless if_busy=wait (or the final save)
        waited = time.perf_counter() - t0
        self._report(trainer)
        meta = cio.make_meta(
            step, trainer.config.run.seed, self._config, trainer.callbacks, trainer.dataset
        )
        self._pin(trainer)  # after make_meta: the plugins' state_dict() read every step
        self._written_at = None
        cio.save(self._mngr, step, trainer.state, meta)
        self._pending = (step, t0, time.perf_counter() - t0, waited)
        self._last_step = step

    def _finite(self, trainer: TrainerView, step: int) -> bool:
        """Whether the state after `step` may be saved: no step so far had a non-finite
        loss or gradient norm, and no array of the state holds NaN or inf. Checked before
        the save starts, so a poisoned state is never committed (the save's own copy
        waits for the step anyway; the check adds one pass over the state)."""
        bad = trainer.nonfinite_step
        if bad is None and all_finite(trainer.state):
            return True
        why = (
            f"the loss or gradient norm of step {bad} was not finite"
            if bad is not None
            else "the state holds NaN or inf values"
        )
        last = f"step {self._last_step}" if self._last_step > 0 else "none"
        self._say(trainer, f"not saving step {step}: {why} (the last one saved: {last})")
        return False

    def _on_written(self) -> None:  # runs on Orbax's background thread
        self._written_at = time.perf_counter()

    def _report(self, trainer: TrainerView) -> None:
        """Prints the line of the pending save once its background write has finished."""
        if self._pending is None or self._written_at is None:
            return
        step, t0, blocked, waited = self._pending
        self._pending = None
        wait = f" (of which {waited:.3f} s waiting for the previous write)" if waited > 1e-3 else ""
        self._say(
            trainer,
            f"saved step {step} | loop blocked {blocked:.3f} s{wait} | background "
            f"write {self._written_at - t0 - blocked:.3f} s | {self.path}/{step}",
        )

    def _finish(self, trainer: TrainerView) -> None:
        if self._mngr is not None:
            with trainer.goodput.timed("checkpoint"):
                self._mngr.wait_until_finished()
            self._report(trainer)

    def _say(self, trainer: TrainerView, text: str) -> None:
        trainer.console.print(f"checkpoint: {text}", markup=False, highlight=False)


def _one_saver_per_directory(saver: Checkpointer, trainer: TrainerView, event: SetupEvent) -> None:
    """Two checkpointers saving to one directory would delete each other's steps."""
    for cb in trainer.callbacks:
        if cb is not saver and isinstance(cb, Checkpointer) and cb._path(event) == saver.path:
            raise ConfigError(
                f"callbacks.{saver.name}",
                f"callbacks.{cb.name} also saves to {saver.path}",
                f"drop one (~callbacks.{cb.name}) or give each its own directory",
            )
