"""run.loss_chunk: the loss projected a chunk of positions at a time equals the loss of the
whole logits, in its sums and its gradients, with padding, z-loss and packed documents; and
the compiled step holds less memory with it."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY, assert_equal_to_rounding
from flax import nnx

from nnxtrain import compose
from nnxtrain.errors import ConfigError
from nnxtrain.model import Transformer
from nnxtrain.train.loss import batch_loss_sums

LENGTH = 12
# a wide vocabulary, so that the logits dominate the step's memory at this size
MODEL = dataclasses.replace(TINY, vocab_size=512, max_len=LENGTH, init_std=0.3)


def batch(documents: bool) -> dict[str, jax.Array]:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, MODEL.vocab_size, (3, LENGTH + 1))
    weights = (rng.random((3, LENGTH)) > 0.25).astype(np.float32)  # some targets masked
    out = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": weights}
    if documents:  # two documents per row, their lengths differing by row
        ids = np.where(np.arange(LENGTH)[None] < np.array([[3], [7], [11]]), 1, 2)
        starts = np.array([3, 7, 11])[:, None]
        out["segment_ids"] = ids.astype(np.int32)
        out["positions"] = np.where(ids == 1, np.arange(LENGTH), np.arange(LENGTH) - starts)
    return {k: jnp.asarray(v) for k, v in out.items()}


@nnx.jit(static_argnums=(2, 3))
def sums_and_grads(model: nnx.Module, b: dict, z_loss: float, chunk: int) -> tuple:
    graphdef, params = nnx.split(model)

    def total(p: nnx.State) -> tuple[jax.Array, dict]:
        sums = batch_loss_sums(nnx.merge(graphdef, p), b, z_loss, chunk)
        return sums["ce"] + sums["z"], sums

    (_, sums), grads = jax.value_and_grad(total, has_aux=True)(params)
    return sums, grads


@pytest.fixture(scope="module")
def model() -> nnx.Module:
    return Transformer(MODEL, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("documents", [False, True], ids=["rows", "documents"])
def test_chunked_loss_and_gradients_equal_the_whole(model, documents):
    b = batch(documents)
    whole, whole_grads = sums_and_grads(model, b, 1e-3, 0)
    assert float(whole["z"]) > 0 and 0 < float(whole["weight"]) < b["weights"].size
    # 4 divides the length; 5 leaves a padded last chunk; 1 is a position at a time
    for chunk in (4, 5, 1):
        sums, grads = sums_and_grads(model, b, 1e-3, chunk)
        # the same B*L terms of each sum, in another order (chunks, then rows)
        assert_equal_to_rounding(sums, whole, b["weights"].size, f"sums, chunk {chunk}")
        assert float(sums["weight"]) == float(whole["weight"])  # weights are exact
        assert_equal_to_rounding(grads, whole_grads, b["weights"].size, f"grads, chunk {chunk}")
    # the comparison can fail: a chunk that loses a position's weight changes the sums
    dropped = {**b, "weights": b["weights"].at[0, -1].set(0.0)}
    assert float(sums_and_grads(model, dropped, 1e-3, 5)[0]["weight"]) != float(whole["weight"])


def test_a_chunk_as_long_as_the_sequence_is_the_whole_loss(model):
    b = batch(False)
    whole = sums_and_grads(model, b, 0.0, 0)[0]
    same = sums_and_grads(model, b, 0.0, LENGTH)[0]
    assert {k: float(v) for k, v in same.items()} == {k: float(v) for k, v in whole.items()}


def test_chunked_step_holds_less_temporary_memory(tmp_path):
    """The compiled train step with chunks of 4 positions needs less temp memory than with
    the whole [batch, length, vocab] logits (their float32 copy and gradient)."""
    from nnxtrain import Trainer

    temps = {}
    for chunk in (0, 4):
        cfg = compose(
            [
                "model.vocab_size=4096",
                "model.emb_dim=32",
                "model.num_layers=1",
                "run.seq_len=64",
                "run.batch_size=8",
                "run.dry_run=true",
                "run.eval_every=0",
                f"run.loss_chunk={chunk}",
                f"run.dir={tmp_path / str(chunk)}",
            ]
        )
        trainer = Trainer(cfg, callbacks=[])
        trainer.fit()
        temps[chunk] = trainer.compiled.memory_analysis().temp_size_in_bytes
    logits_f32 = 8 * 64 * 4096 * 4
    assert temps[4] < temps[0] - logits_f32, temps


def test_a_negative_chunk_is_a_config_error():
    with pytest.raises(ConfigError, match=r"^run\.loss_chunk: "):
        compose(["run.loss_chunk=-1"])
