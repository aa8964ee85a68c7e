"""The spike guard: a non-finite or spiking step leaves the state bitwise as it was, is
logged, too many in a row end the run as diverged, and a resumed run skips the same
batches and ends bitwise where the uninterrupted run ends."""

import io
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from callbacks_for_tests import StopAt
from conftest import TINY, run_cli_in_process
from flax import nnx
from nnxtrain.plugins.checkpointer import Checkpointer
from nnxtrain.plugins.spike_guard import SKIPPED_FILE, SpikeGuard
from rich.console import Console

from nnxtrain import (
    ConfigError,
    SetupEvent,
    StepEndEvent,
    TrainEndEvent,
    Trainer,
    TrainStartEvent,
    compose,
)
from nnxtrain.config import OptimConfig
from nnxtrain.data import SyntheticData
from nnxtrain.model import Transformer
from nnxtrain.train.step import GUARD_OFF, TrainState, make_optimizer, make_train_step

# -- the compiled step honours the guard ---------------------------------------------------


def step_and_state() -> tuple[Any, TrainState]:
    graphdef, params = nnx.split(Transformer(TINY, rngs=nnx.Rngs(0)))
    tx, schedule = make_optimizer(OptimConfig(lr=1e-2, warmup_steps=0), total_steps=10)
    step = jax.jit(make_train_step(graphdef, tx, schedule, z_loss=0.0, grad_accum=1))
    return step, TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))


def a_batch(weight: float = 1.0) -> dict[str, jax.Array]:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, TINY.vocab_size, size=(2, 9)).astype(np.int32)
    return {
        "inputs": jnp.asarray(tokens[:, :-1]),
        "targets": jnp.asarray(tokens[:, 1:]),
        "weights": jnp.full((2, 8), weight, jnp.float32),
    }


def same_bits(a: Any, b: Any) -> bool:
    return all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


@pytest.mark.parametrize(
    ("weight", "limits", "what"),
    [
        (float("nan"), (np.inf, np.inf), "a NaN loss"),
        (1.0, (0.5, np.inf), "a loss above its limit"),
        (1.0, (np.inf, 1e-6), "a gradient norm above its limit"),
    ],
)
def test_a_bad_step_keeps_params_and_optimizer_state_bitwise(weight, limits, what):
    step, state = step_and_state()
    before = jax.device_get(state)
    after, metrics = step(state, a_batch(weight), jnp.asarray([1.0, *limits], jnp.float32))
    assert float(metrics["skipped"]) == 1, what
    assert same_bits(after.params, before.params), what
    assert same_bits(after.opt_state, before.opt_state), what
    assert int(after.step) == 1  # the batch is consumed


def test_a_step_without_loss_tokens_keeps_the_state_unskipped():
    """Zero gradients, yet AdamW's weight decay (0.1 here) would shrink the weights."""
    step, state = step_and_state()
    before = jax.device_get(state)
    for guard in [(1.0, 1e9, 1e9), GUARD_OFF]:
        after, metrics = step(state, a_batch(0.0), jnp.asarray(guard, jnp.float32))
        assert float(metrics["total_weights"]) == 0 and float(metrics["skipped"]) == 0
        assert same_bits(after.params, before.params)
        assert same_bits(after.opt_state, before.opt_state)
        assert int(after.step) == 1


def test_a_good_step_or_a_guard_that_is_off_updates():
    step, state = step_and_state()
    before = jax.device_get(state)
    after, metrics = step(state, a_batch(), jnp.asarray([1.0, 1e9, 1e9], jnp.float32))
    assert float(metrics["skipped"]) == 0 and not same_bits(after.params, before.params)
    _, state = step_and_state()
    nan_after, metrics = step(state, a_batch(float("nan")), jnp.asarray(GUARD_OFF, jnp.float32))
    assert float(metrics["skipped"]) == 0
    assert not np.isfinite(np.asarray(jax.tree.leaves(nan_after.params)[0])).all()


# -- the plugin in a run ------------------------------------------------------------------

BASE = ["model=tiny", "run.batch_size=4", "run.seq_len=16", "run.eval_every=0", "callbacks=none"]
NAN_BATCHES, SPIKE_BATCHES = (24,), (30, 31)


class BadBatches(SyntheticData):
    """The synthetic data, with NaN weights in some train batches and uniformly random
    tokens (a loss far above the trained model's) in others."""

    def __init__(self, *args: Any, nan: tuple[int, ...], spike: tuple[int, ...]):
        super().__init__(*args)
        self.vocab, self.nan, self.spike = args[0], nan, spike

    def batch(self, step: int, batch_size: int, seq_len: int, split: str = "train", rows=None):
        out = super().batch(step, batch_size, seq_len, split, rows)
        if split == "train" and step in self.nan:
            out["weights"] = np.full_like(out["weights"], np.nan)
        if split == "train" and step in self.spike:
            rng = np.random.default_rng(step)
            tokens = rng.integers(0, self.vocab, size=out["inputs"].shape, dtype=np.int32)
            out["inputs"], out["targets"] = tokens, np.roll(tokens, -1, axis=1)
        return out


def run(
    run_dir: Path,
    steps: int,
    *extra: Any,
    nan: tuple[int, ...] = NAN_BATCHES,
    spike: tuple[int, ...] = SPIKE_BATCHES,
    guard: SpikeGuard | None = None,
) -> tuple[Any, str]:
    cfg = compose([*BASE, f"run.steps={steps}", f"run.dir={run_dir}", "optim.warmup_steps=2"])
    data = BadBatches(
        cfg.model.vocab_size,
        cfg.data.branching,
        cfg.data.source_seed,
        cfg.run.seed,
        nan=nan,
        spike=spike,
    )
    guard = guard or SpikeGuard(window=20, k=3.0, warmup=10, max_consecutive=3)
    guard.name = "spike_guard"
    out = io.StringIO()
    callbacks = [guard, Checkpointer(every=0), *extra]
    trainer = Trainer(cfg, callbacks, dataset=data, console=Console(file=out, width=300))
    return trainer.fit(), out.getvalue()


def skipped(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / SKIPPED_FILE).read_text().splitlines()]


def test_nan_and_spiking_batches_are_skipped_and_logged(tmp_path: Path):
    result, text = run(tmp_path, 36)
    assert result.reason == "completed"
    rows = skipped(tmp_path)
    assert [r["batch"] for r in rows] == [*NAN_BATCHES, *SPIKE_BATCHES]
    assert [r["why"] for r in rows] == ["not finite", "spike", "spike"]
    assert all(r["step"] == r["batch"] + 1 for r in rows)
    assert "spike_guard: skipped step 25 (batch 24): not finite" in text
    assert np.isfinite(result.metrics["loss"])


def test_too_many_skips_in_a_row_end_the_run_as_diverged(tmp_path: Path):
    result, _ = run(tmp_path, 36, nan=(20, 21, 22, 23), spike=())
    assert result.reason.startswith("diverged: spike_guard skipped 3 steps in a row")
    # The third skip (step 23) is read two steps later (the guard never waits for a step in
    # flight), so steps 24 and 25 ran too; the stop comes before step 26.
    assert result.step == 25
    assert [r["batch"] for r in skipped(tmp_path)] == [20, 21, 22, 23]


def test_a_resumed_run_skips_the_same_batches_and_ends_bitwise_equal(tmp_path: Path):
    whole, _ = run(tmp_path / "whole", 36)
    first, _ = run(tmp_path / "resumed", 36, StopAt(27))  # between the NaN and the spikes
    assert first.reason.startswith("stopped") and first.step == 27
    resumed, _ = run(tmp_path / "resumed", 36)
    assert resumed.step == 36
    assert skipped(tmp_path / "resumed") == skipped(tmp_path / "whole")
    assert same_bits(jax.device_get(resumed.state), jax.device_get(whole.state))


def test_options_are_checked(tmp_path: Path):
    with pytest.raises(Exception, match=r"callbacks\.spike_guard\.window"):
        run(tmp_path, 4, guard=SpikeGuard(window=0))


def test_the_cli_exits_3_when_the_guard_gives_up(tmp_path: Path):
    # lr 1e6: step 2's update makes every later loss NaN; the guard (on by default) skips
    # them and ends the run after max_consecutive in a row, as a failure.
    args = [*BASE[:-1], "run.steps=20", f"run.dir={tmp_path / 'run'}", "optim.lr=1e6"]
    args += [
        "optim.warmup_steps=0",
        "~callbacks.checkpoint",
        "callbacks.spike_guard.max_consecutive=3",
    ]
    proc = run_cli_in_process(args, tmp_path)
    assert proc.returncode == 3, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("nnxtrain: diverged: spike_guard skipped 3 steps in a row"), last


# -- warm-up spikes and where a run of bad steps began (no model: the hooks alone) --------


class GuardView:
    """Just enough of a TrainerView for the guard's hooks; it skips a step as the compiled
    step would, by the limits the guard last gave, and records what the guard marks."""

    def __init__(self) -> None:
        self.console = Console(file=io.StringIO(), width=300)
        self.limits, self.step = (np.inf, np.inf), 0
        self.marks: list[int | None] = []  # each change of mark_divergence
        self.failed: str | None = None

    def skip_bad_steps(self, loss_limit: float = np.inf, norm_limit: float = np.inf) -> None:
        self.limits = (loss_limit, norm_limit)

    def mark_divergence(self, since: int | None) -> None:
        if not self.marks or self.marks[-1] != since:
            self.marks.append(since)

    def request_failure_stop(self, reason: str) -> None:
        self.failed = self.failed or reason


def start(guard: SpikeGuard, run_dir: Path, step: int = 0) -> GuardView:
    """The guard's set-up and train start in `run_dir`, at `step`."""
    guard.name, view = "spike_guard", GuardView()
    guard.on_setup(view, SetupEvent(None, None, None, None, str(run_dir), None))  # type: ignore[arg-type]
    guard.on_train_start(view, TrainStartEvent(step, 100))
    return view


def feed(guard: SpikeGuard, run_dir: Path, losses: list[float]) -> GuardView:
    """Steps 1, 2, ... with these losses (grad norm 1) through the guard's hooks."""
    view = start(guard, run_dir)
    for step, loss in enumerate(losses, 1):
        skipped = not np.isfinite(loss) or loss > view.limits[0]
        record = SimpleNamespace(
            metrics={"loss": loss, "grad_norm": 1.0, "skipped": float(skipped)}
        )
        view.step = step
        guard.on_step_end(view, StepEndEvent(step, 100, 0, None, lambda r=record: r))  # type: ignore[arg-type]
    guard.on_train_end(view, TrainEndEvent(len(losses), "completed", 0.0))
    return view


BLOWN_UP = [4.17, 4.18, 2448.0, 1876.0, 1875.0, 1871.0, 1899.0, 1809.0]  # the lr=300


@pytest.mark.parametrize(
    ("losses", "options", "skips", "bad", "since", "fails"),
    [
        # Within the warm-up (20 steps): the limit for step 4 on is 10x the median of the
        # good losses so far; step 3 had no limit (nothing known yet) but is judged bad
        # once read, so the divergence began there.
        (BLOWN_UP, {}, [4, 5, 6, 7, 8], [3, 4, 5, 6, 7, 8], 3, True),
        # The median, not the lowest: one easy batch (0.05) leaves 2.5 a good loss, and a
        # loss 15x the others is a spike; the run of bad steps ends with the next good one.
        ([2.0, 0.05, 2.1, 1.9, 2.2, 2.5, 30.0, 2.0], {}, [7], [7], None, False),
        # warmup_factor=0: during the warm-up only non-finite steps are skipped.
        ([4.0, 4.0, 4.0, 2448.0, float("nan")], {"warmup_factor": 0}, [5], [5], 5, False),
    ],
    ids=["blown-up-in-warm-up", "median-not-minimum", "factor-off"],
)
def test_warm_up_spikes_and_the_start_of_a_divergence(
    tmp_path: Path, losses, options, skips, bad, since, fails
):
    guard = SpikeGuard(**options)
    view = feed(guard, tmp_path, losses)
    assert [r["step"] for r in skipped(tmp_path)] == skips
    assert [s for s, v in sorted(guard.values.items()) if v[3]] == bad
    assert view.marks[-1] == since  # what the trainer was last told
    assert (view.failed is not None) == fails, view.failed


def test_the_start_of_a_divergence_rides_in_checkpoints(tmp_path: Path):
    guard = SpikeGuard(max_consecutive=10)
    feed(guard, tmp_path, BLOWN_UP[:5])
    state = json.loads(json.dumps(guard.state_dict()))  # as a checkpoint's meta holds it
    resumed = SpikeGuard()
    resumed.load_state_dict(state)
    assert resumed.bad_since == guard.bad_since == 3
    assert start(resumed, tmp_path, step=5).marks == [3]
    # A checkpoint of an older nnxtrain: values without the `bad` flag (skipped = bad).
    resumed.load_state_dict({"values": {"1": [4.0, 1.0, False], "2": [90.0, 1.0, True]}})
    assert resumed.bad_since is None and [v[3] for v in resumed.values.values()] == [False, True]


def test_warmup_factor_is_checked(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"callbacks\.spike_guard\.warmup_factor"):
        feed(SpikeGuard(warmup_factor=0.5), tmp_path, [])


def test_a_step_without_loss_tokens_is_neither_judged_nor_learnt_from(tmp_path: Path):
    """Its loss 0 is no measurement: in the history it would pull the median down, and a
    loss 10x that median would then read as a spike."""
    guard = SpikeGuard(warmup=3)
    view = start(guard, tmp_path)
    for step, (loss, weights) in enumerate([(4.0, 9.0), (0.0, 0.0), (4.1, 9.0), (4.2, 9.0)], 1):
        metrics = {"loss": loss, "grad_norm": 1.0, "skipped": 0.0, "total_weights": weights}
        record = SimpleNamespace(metrics=metrics)
        guard.on_step_end(view, StepEndEvent(step, 100, 0, None, lambda r=record: r))  # type: ignore[arg-type]
    guard.on_train_end(view, TrainEndEvent(4, "completed", 0.0))
    assert sorted(guard.values) == [1, 3, 4] and guard.bad_since is None
