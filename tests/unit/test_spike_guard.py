"""The spike guard: a non-finite or spiking step leaves the state bitwise as it was, is
logged, too many in a row end the run as diverged, and a resumed run skips the same
batches and ends bitwise where the uninterrupted run ends."""

import io
import json
from pathlib import Path
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

from nnxtrain import Trainer, compose
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
