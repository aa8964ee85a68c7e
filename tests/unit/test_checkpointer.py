"""The checkpointer plugin in-process: exact resume, restore checks, policies, options.

Every run is the tiny model for a few steps on one CPU device; runs share the session's
compilation cache, so each costs well under a second after the first compile.
"""

import dataclasses
import io
import json
import os
import re
import shutil
import threading
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from nnxtrain.plugins.checkpointer import Checkpointer
from nnxtrain.plugins.metrics_logger import MetricsLogger
from nnxtrain.plugins.sharding_printer import ShardingPrinter
from rich.console import Console

from nnxtrain import Callback, ConfigError, PluginError, Trainer, UserError, compose
from nnxtrain.checkpoint.checks import config_diff

BASE = [
    "model=tiny",
    "run.steps=20",
    "run.batch_size=4",
    "run.seq_len=16",
    "run.eval_every=0",
    "callbacks=none",
]


class Losses(Callback):
    """Records each step's loss; stops after `stop_at`; its counter rides in checkpoints."""

    def __init__(self, stop_at: int | None = None, save_at: tuple[int, ...] = ()):
        self.losses: dict[int, float] = {}
        self.stop_at, self.save_at, self.seen = stop_at, save_at, 0
        self.start_state: Any = None
        self.end_state: Any = None

    def on_train_start(self, trainer: Any, event: Any) -> None:
        self.start_state = jax.device_get(trainer.state)

    def on_train_end(self, trainer: Any, event: Any) -> None:
        self.end_state = jax.device_get(trainer.state)

    def on_step_end(self, trainer: Any, event: Any) -> None:
        self.losses[event.step] = event.metrics["loss"]
        self.seen += 1
        if event.step in self.save_at:
            trainer.request_save()
        if event.step == self.stop_at:
            trainer.request_stop("test stop")

    def state_dict(self) -> dict[str, Any]:
        return {"seen": self.seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen = state["seen"]


def fit(run_dir: Path, *callbacks: Callback, overrides: tuple[str, ...] = ()) -> tuple[Any, str]:
    """Trains with BASE + overrides in run_dir; returns (FitResult, console text)."""
    out = io.StringIO()
    cfg = compose([*BASE, *overrides, f"run.dir={run_dir}"])
    result = Trainer(cfg, list(callbacks), console=Console(file=out, width=400)).fit()
    return result, out.getvalue()


def steps_on_disk(run_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Losses]:
    """20 uninterrupted steps saving every 4 (waiting for writes), keeping all five; with
    the sharding printer's shardings.txt."""
    run_dir = tmp_path_factory.mktemp("reference")
    losses = Losses()
    fit(run_dir, ShardingPrinter(), Checkpointer(every=4, keep=5, if_busy="wait"), losses)
    assert steps_on_disk(run_dir) == [4, 8, 12, 16, 20]
    assert "train step activations" in (run_dir / "shardings.txt").read_text()
    return run_dir, losses


def test_stop_at_12_and_rerun_gives_bitwise_identical_losses(reference, tmp_path):
    _, ref = reference
    first = Losses(stop_at=12)
    result, text = fit(tmp_path, Checkpointer(every=5), first)
    assert result.step == 12 and "saved step 12 |" in text
    resumed = Losses()
    result, text = fit(tmp_path, Checkpointer(every=5), resumed)
    assert f"resumed from step 12 ({tmp_path}/checkpoints/12)" in text
    assert result.step == 20 and sorted(resumed.losses) == list(range(13, 21))
    assert [resumed.losses[s] for s in range(13, 21)] == [ref.losses[s] for s in range(13, 21)]
    assert resumed.seen == 20  # 12 restored from the checkpoint + 8 new


class Compiled(Callback):
    """Records whether the steps were compiled."""

    def __init__(self) -> None:
        self.compiled = False

    def on_compile(self, trainer: Any, event: Any) -> None:
        self.compiled = True


RECORDS = ("config.yaml", "run_info.json", "metrics.jsonl")


@pytest.mark.parametrize("steps", [20, 10], ids=["same steps", "fewer steps"])
def test_rerunning_a_finished_run_has_nothing_to_do_and_keeps_its_records(
    reference, tmp_path, steps
):
    ref_dir, _ = reference
    run_dir = tmp_path / "run"
    shutil.copytree(ref_dir, run_dir)
    (run_dir / "metrics.jsonl").write_text('{"step": 20, "loss": 1.0}\n')
    before = {name: (run_dir / name).read_bytes() for name in RECORDS}
    # The sharding printer's file, dated in the past: a rewrite shows in its time too.
    shardings = run_dir / "shardings.txt"
    os.utime(shardings, ns=(10**18, 10**18))
    shardings_before = shardings.read_bytes()
    final = json.loads(before["run_info.json"])["final"]
    assert final["step"] == 20 and final["metrics"]
    losses, compiled, done = Losses(), Compiled(), []
    logger = MetricsLogger(log_every=1, tensorboard=False)
    # In a thread: a loop that waits for a step it never ran must fail here, not hang.
    worker = threading.Thread(
        target=lambda: done.append(
            fit(
                run_dir,
                ShardingPrinter(),  # before the checkpointer: its on_setup precedes the restore
                logger,
                Checkpointer(),
                losses,
                compiled,
                overrides=(f"run.steps={steps}",),
            )
        ),
        daemon=True,
    )
    worker.start()
    worker.join(timeout=120)
    assert done, "fit() did not return"
    result, text = done[0]
    assert f"nothing to do: {run_dir} already holds step 20 (run.steps={steps})" in text
    assert (result.step, result.reason, losses.seen) == (20, "nothing to do", 20)
    assert result.metrics == final["metrics"]  # the records of the run that trained there
    assert not compiled.compiled and losses.losses == {}
    assert {name: (run_dir / name).read_bytes() for name in RECORDS} == before
    assert shardings.read_bytes() == shardings_before
    assert shardings.stat().st_mtime_ns == 10**18
    assert steps_on_disk(run_dir) == [4, 8, 12, 16, 20] and "saved step" not in text


def test_a_dry_run_keeps_the_records_of_a_trained_run(reference, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference[0], run_dir)
    before = {name: (run_dir / name).read_bytes() for name in RECORDS[:2]}
    result, text = fit(run_dir, Checkpointer(), overrides=("run.dry_run=true", "run.seed=7"))
    assert result.reason == "dry run" and "keeping the records of the run in" in text
    assert {name: (run_dir / name).read_bytes() for name in RECORDS[:2]} == before
    # In a directory of its own (or of another dry run), a dry run writes them.
    for seed in (7, 8):
        fit(tmp_path / "dry", overrides=("run.dry_run=true", f"run.seed={seed}"))
        assert f"seed: {seed}" in (tmp_path / "dry" / "config.yaml").read_text()
        assert json.loads((tmp_path / "dry" / "run_info.json").read_text())["dry_run"] is True


def test_load_from_a_mid_run_step_continues_exactly(reference, tmp_path):
    """Step 12 was saved while the loop went on (the state is donated to the next step)."""
    ref_dir, ref = reference
    losses = Losses()
    _, text = fit(tmp_path, Checkpointer(load_from=str(ref_dir / "checkpoints" / "12")), losses)
    assert "started from step 12" in text
    assert [losses.losses[s] for s in range(13, 21)] == [ref.losses[s] for s in range(13, 21)]


def test_load_params_only_is_replaced_by_run_init_from(reference, tmp_path):
    """Starting from a run's weights alone is `run.init_from` (tests/unit/test_init_from.py)."""
    ck = Checkpointer(load_from=str(reference[0]), load_params_only=True)
    with pytest.raises(ConfigError) as err:
        fit(tmp_path, ck)
    assert str(err.value).startswith(
        "callbacks.Checkpointer.load_params_only: is replaced by run.init_from"
    )
    assert "set run.init_from=PATH" in str(err.value)
    assert not (tmp_path / "checkpoints").exists()


def test_a_different_model_shape_is_refused_naming_parameter_and_key(reference, tmp_path):
    shutil.copytree(reference[0] / "checkpoints", tmp_path / "checkpoints")
    with pytest.raises(UserError) as err:
        fit(tmp_path, Checkpointer(), overrides=("model.emb_dim=48",))
    message = str(err.value)
    assert "\n" not in message
    assert "params/embed is (64, 32) float32 in the checkpoint but (64, 48) float32" in message
    assert "model.emb_dim: 32 -> 48" in message


def _corrupt(step_dir: Path) -> None:
    for root, _, files in os.walk(step_dir / "state"):
        for name in files:
            path = Path(root) / name
            if path.parent.name == "d":  # array data files: flip one byte in each
                data = bytearray(path.read_bytes())
                data[len(data) // 2] ^= 0xFF
                path.write_bytes(bytes(data))


def test_a_corrupted_checkpoint_is_an_error_or_falls_back(reference, tmp_path):
    ref_dir, _ = reference
    shutil.copytree(ref_dir / "checkpoints", tmp_path / "checkpoints")
    _corrupt(tmp_path / "checkpoints" / "20")
    with pytest.raises(UserError, match=r"checkpoints/20 is unreadable .*fallback=true"):
        fit(tmp_path, Checkpointer(), overrides=("run.steps=24",))
    losses = Losses()
    ck = Checkpointer(every=4, fallback=True)  # saves step 20 again
    _, text = fit(tmp_path, ck, losses, overrides=("run.steps=24",))
    assert "checkpoints/20 is unreadable" in text and "falling back to step 16" in text
    assert "resumed from step 16" in text and sorted(losses.losses) == list(range(17, 25))
    assert "moved the unreadable checkpoint(s) aside: 20.unreadable-" in text
    assert steps_on_disk(tmp_path) == [16, 20, 24]
    assert [p.name for p in (tmp_path / "checkpoints").glob("20.unreadable-*")]


def test_an_unfinished_save_is_ignored_with_a_warning(reference, tmp_path):
    shutil.copytree(reference[0] / "checkpoints", tmp_path / "checkpoints")
    shutil.copytree(
        tmp_path / "checkpoints" / "20", tmp_path / "checkpoints" / "21.orbax-checkpoint-tmp"
    )
    shutil.rmtree(tmp_path / "checkpoints" / "21.orbax-checkpoint-tmp" / "meta")
    # 24 steps: the step the test above compiled (the step count is in its lr schedule)
    _, text = fit(tmp_path, Checkpointer(), overrides=("run.steps=24",))
    assert "ignoring 1 unfinished save(s)" in text and "21.orbax-checkpoint-tmp" in text
    assert "resumed from step 20" in text and "note:" not in text  # run.steps is bookkeeping
    assert not (tmp_path / "checkpoints" / "21.orbax-checkpoint-tmp").exists()
    assert steps_on_disk(tmp_path)[-1] == 24


def test_keep_last_and_every_mth_and_requested_saves(tmp_path):
    ck = Checkpointer(every=5, keep=2, keep_every=10, if_busy="wait")
    _, text = fit(tmp_path, Losses(save_at=(3,)), ck)  # the request comes before ck's hook
    assert "saved step 3 |" in text  # asked for by another plugin, then rotated out
    assert steps_on_disk(tmp_path) == [10, 15, 20]


class HeldWrites:
    """Checkpoint writes that cannot finish while `gate` is closed, whatever the machine's
    speed. A wait for a running write opens it 50 ms after the wait began, so the wait is
    real (the plugin reports waits over 1 ms) and nothing hangs."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.gate, self.managers = threading.Event(), []
        save, self._wait = (
            ocp.JsonCheckpointHandler.async_save,
            ocp.CheckpointManager.wait_until_finished,
        )
        gate = self.gate

        async def held_save(handler: Any, *args: Any, **kwargs: Any) -> list[Any]:
            futures = await save(handler, *args, **kwargs) or []

            async def until_open() -> None:
                gate.wait()

            return [*futures, ocp.future.CommitFutureAwaitingContractedSignals(until_open())]

        def opening_wait(mngr: Any) -> None:
            self.managers.append(mngr)
            if not gate.is_set() and mngr.is_saving_in_progress():
                threading.Timer(0.05, gate.set).start()
            self._wait(mngr)

        monkeypatch.setattr(ocp.JsonCheckpointHandler, "async_save", held_save)
        monkeypatch.setattr(ocp.CheckpointManager, "wait_until_finished", opening_wait)

    def release(self) -> None:
        """Opens the gate and returns once the held writes have finished."""
        self.gate.set()
        for mngr in self.managers:
            self._wait(mngr)


class ReleaseAt(Callback):
    """Lets the held writes finish at step `at`, before the hooks of later callbacks."""

    def __init__(self, held: HeldWrites, at: int):
        self.held, self.at = held, at

    def on_step_end(self, trainer: Any, event: Any) -> None:
        if event.step == self.at:
            self.held.release()


@pytest.fixture
def held_writes(monkeypatch: pytest.MonkeyPatch) -> HeldWrites:
    return HeldWrites(monkeypatch)


def test_skip_policy_skips_while_a_write_runs(tmp_path, held_writes):
    # Step 5's write holds until the final save waits for it: 10 and 15 are skipped.
    _, text = fit(tmp_path, Checkpointer(every=5))
    assert "skipped the save at step 10: the write of step 5 is still running" in text
    assert "skipped the save at step 15" in text
    assert steps_on_disk(tmp_path) == [5, 20]
    assert held_writes.gate.is_set()


def test_a_request_while_a_write_runs_is_saved_once_the_writer_is_free(tmp_path, held_writes):
    # Step 3 is saved on request (held); the request at 7 waits until the write is released
    # at step 12, and is saved there. No warning: requests are deferred, not skipped.
    ck = Checkpointer(every=100)
    _, text = fit(tmp_path, ReleaseAt(held_writes, 12), Losses(save_at=(3, 7)), ck)
    assert steps_on_disk(tmp_path) == [3, 12, 20]
    assert "saved step 12 |" in text and "skipped" not in text


def test_wait_policy_waits_for_the_previous_write(tmp_path, held_writes):
    _, text = fit(tmp_path, Checkpointer(every=5, if_busy="wait"), overrides=("run.steps=10",))
    assert "skipped" not in text
    assert "saved step 10 | loop blocked" in text and "waiting for the previous write" in text
    assert steps_on_disk(tmp_path) == [5, 10]


def test_no_final_save_after_a_non_finite_loss(tmp_path):
    result, text = fit(tmp_path, Checkpointer(every=100), overrides=("optim.lr=1e30",))
    assert result.reason.startswith("not finite")
    assert "no final save" in text and not steps_on_disk(tmp_path)


def restored_states(run_dir: Path) -> dict[int, Any]:
    """Every checkpoint's saved arrays, read back as numpy trees."""
    mngr = ocp.CheckpointManager(run_dir / "checkpoints")
    try:
        return {
            s: mngr.restore(s, args=ocp.args.Composite(state=ocp.args.PyTreeRestore()))["state"]
            for s in mngr.all_steps()
        }
    finally:
        mngr.close()


def all_finite_tree(tree: Any) -> bool:
    return all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(tree))


def test_a_step_with_a_non_finite_loss_is_never_saved(tmp_path):
    # The reproduction: lr=1e3 goes NaN within a few steps. With a save due at
    # every step, the save at the first NaN step used to commit NaN parameters that every
    # rerun then resumed into.
    losses = Losses()
    result, text = fit(
        tmp_path,
        losses,
        Checkpointer(every=1, if_busy="wait", keep=100),
        overrides=("optim.lr=1e3", "run.steps=40"),
    )
    assert result.reason.startswith("not finite"), result.reason
    first_bad = min(s for s, v in losses.losses.items() if not np.isfinite(v))
    assert f"not saving step {first_bad}: the loss or gradient norm of step {first_bad}" in text
    saved = restored_states(tmp_path)
    # The state of step first_bad - 1 gave that NaN: saved (its own metrics were finite),
    # then set aside when the run ended (a rerun would only compute the NaN again).
    assert sorted(saved) == list(range(1, first_bad - 1)), (first_bad, sorted(saved))
    assert all(all_finite_tree(state) for state in saved.values())
    assert (tmp_path / "checkpoints" / "diverged" / str(first_bad - 1) / "meta").is_dir()


class Poison(Callback):
    """Puts a NaN into one parameter after step `at` (its loss and grad norm are finite)."""

    def __init__(self, at: int):
        self.at = at

    def on_step_end(self, trainer: Any, event: Any) -> None:
        if event.step == self.at:
            params = jax.tree.map(lambda x: x, trainer.state.params)
            scale = params["final_norm"]["scale"]
            scale[...] = scale[...].at[0].set(np.nan)
            trainer.state = dataclasses.replace(trainer.state, params=params)


def test_a_state_holding_nan_is_never_saved_even_with_finite_metrics(tmp_path):
    # if_busy=wait: the save at step 4 must reach the finiteness check. With the default
    # (skip) it is skipped, never checked, whenever step 2's background write still runs,
    # which is most of the time once this process has compiled the steps' small functions
    # (the suite's earlier runs do): the "not saving" line then never appears.
    ck = Checkpointer(every=2, if_busy="wait")
    result, text = fit(tmp_path, Poison(at=4), ck, overrides=("run.steps=10",))
    assert "not saving step 4: the state holds NaN or inf values" in text, text
    assert sorted(restored_states(tmp_path)) == [2]
    assert result.reason.startswith("not finite")  # step 5 computes on the NaN


def test_a_run_stopped_right_after_a_non_finite_step_makes_no_final_save(tmp_path):
    # lr=1e30: step 3's gradient norm is NaN. A plugin stops the run at step 3, so the
    # loop ends "stopped" before it looks at that step's metrics; the final save (made
    # for stops and signals) used to commit the NaN state.
    result, text = fit(
        tmp_path,
        Losses(stop_at=3),
        Checkpointer(every=0),
        overrides=("optim.lr=1e30", "run.steps=5"),
    )
    assert result.reason == "stopped: test stop" and result.step == 3
    assert "not saving step 3: the loss or gradient norm of step 3 was not finite" in text
    assert not steps_on_disk(tmp_path)


@pytest.mark.parametrize(
    "option, value",
    [
        ("every", "-1"),
        ("keep", "0"),
        ("keep_every", "often"),
        ("if_busy", "block"),
        ("fallback", "maybe"),
        ("load_params_only", "true"),  # replaced by run.init_from
    ],
)
def test_bad_options_fail_in_one_line_naming_the_key(tmp_path, option, value):
    cfg = compose([*BASE[:-1], f"callbacks.checkpoint.{option}={value}", f"run.dir={tmp_path}"])
    with pytest.raises(ConfigError) as err:
        Trainer(cfg).fit()
    assert str(err.value).startswith(f"callbacks.checkpoint.{option}: ")
    assert "\n" not in str(err.value)


def test_config_diff_lists_what_changed_model_and_optim_first():
    saved = {
        "run": {"steps": 10, "seed": 0, "dir": "a", "log_every": 5},
        "optim": {"lr": 0.003, "b1": 0.9},
        "model": {"emb_dim": 32, "num_layers": 2},
        "callbacks": {"metrics": {"log_every": 5}},
    }
    current = {
        "run": {"steps": 20, "seed": 1, "dir": "b", "log_every": 1},
        "optim": {"lr": 0.001, "b1": 0.9},
        "model": {"emb_dim": 48, "num_layers": 2},
        "callbacks": {},
    }
    assert config_diff(saved, current) == [
        "model.emb_dim: 32 -> 48",
        "optim.lr: 0.003 -> 0.001",
        "run.seed: 0 -> 1",
    ]


def test_two_checkpointers_on_one_directory_are_refused(tmp_path):
    cfg = compose([*BASE[:-1], "+callbacks.ckpt2._target_=checkpointer", f"run.dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"^callbacks.checkpoint: callbacks.ckpt2 also saves to"):
        Trainer(cfg).fit()


@pytest.mark.parametrize(
    "directory",
    ["a_file", "/proc/self", "/proc/self/checkpoints"],
    ids=["a file", "an existing unwritable dir", "a dir that cannot be created"],
)
def test_an_unwritable_checkpoint_directory_fails_at_setup(tmp_path, directory):
    (tmp_path / "a_file").write_text("keep me")
    compiled = Compiled()
    with pytest.raises(ConfigError) as err:
        fit(tmp_path, Checkpointer(directory=directory), compiled)
    assert re.match(
        r"^callbacks\.Checkpointer\.directory: .* Fix: set it to a writable", str(err.value)
    )
    assert directory.split("/")[-1] in str(err.value) and "\n" not in str(err.value)
    assert not compiled.compiled  # found before compiling, let alone training
    assert (tmp_path / "a_file").read_text() == "keep me"


@pytest.mark.parametrize("source", ["empty", "a_file", "missing"])
def test_load_from_without_a_checkpoint_names_the_key(tmp_path, source):
    (tmp_path / "empty").mkdir()
    (tmp_path / "a_file").write_text("")
    ck = Checkpointer(load_from=str(tmp_path / source))
    with pytest.raises(ConfigError, match=r"^callbacks.Checkpointer.load_from: no complete"):
        fit(tmp_path / "run", ck)


class UnsavableState(Callback):
    """A plugin whose state JSON cannot hold (a set)."""

    def state_dict(self) -> dict[str, Any]:
        return {"seen": {1, 2}}


def test_a_state_json_cannot_hold_is_an_error_naming_the_plugin(tmp_path):
    plugin = UnsavableState()
    plugin.name = "unsavable"
    with pytest.raises(PluginError, match=r"^callbacks\.unsavable: state_dict\(\) returned"):
        fit(tmp_path, Checkpointer(every=2), plugin)
    assert steps_on_disk(tmp_path) == []  # refused before anything was written
