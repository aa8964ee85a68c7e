"""The mixture-of-experts block (nnxtrain/model/moe.py) against a dense reference written
here in plain jnp: every expert computed for every token, masked to the router's top-k.
The router is built so that the experts receive unequal numbers of tokens and some none.
Dropless equals it, values and gradients, both ways (`jax.lax.ragged_dot`, and the
expert-sorted tiles CPU runs by default); capacity mode with room for every
pair equals dropless, and with a small capacity drops exactly the pairs past each expert's
first `capacity` (in token order) and counts them. Also: the load-balancing statistics
and the `model.moe.*` checks. (The scanned stack: tests/interop/hf_mesh_child.py runs the
experts scanned on 8 devices against the unrolled one-device model.)"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY, assert_equal_to_rounding
from flax import nnx

from nnxtrain.config import ModelConfig, MoeConfig, layer_plan, validate_model
from nnxtrain.errors import ConfigError
from nnxtrain.model import Transformer
from nnxtrain.model.cache import KVCache
from nnxtrain.model.layers import MLP
from nnxtrain.model.moe import MoE, aux_losses, layer_stats

EXPERTS, TOP_K = 8, 2
MOE = dataclasses.replace(TINY, moe=MoeConfig(experts=EXPERTS, top_k=TOP_K, mlp_dim=12))


def block(cfg: ModelConfig = MOE) -> MoE:
    moe = MoE(cfg, rngs=nnx.Rngs(0))
    # Skewed router: X's feature 0 is a constant 1, so router row 0 biases the logits:
    # experts 6 and 7 never win, expert 0 often.
    bias = jnp.asarray([1.0, 0.5, 0.2, 0.0, 0.0, -0.2, -50.0, -50.0])
    moe.router[...] = (moe.router[...] * 50).at[0].set(bias)
    return moe


X = jax.random.normal(jax.random.key(1), (2, 12, TINY.emb_dim)).at[..., 0].set(1.0)  # 24 tokens


def picks(moe: MoE, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The reference routing: softmax in float32, top-k, renormalised."""
    flat = x.reshape(-1, x.shape[-1])
    probs = jax.nn.softmax((flat @ moe.router[...]).astype(jnp.float32), axis=-1)
    weights, ids = jax.lax.top_k(probs, TOP_K)
    return weights / weights.sum(-1, keepdims=True), ids


def dense_reference(moe: MoE, x: jax.Array, keep: np.ndarray | None = None) -> jax.Array:
    """Every expert on every token, the outputs masked by the top-k weights (and `keep`)."""
    flat = x.reshape(-1, x.shape[-1])
    weights, ids = picks(moe, x)
    if keep is not None:
        weights = weights * keep
    rows = np.arange(flat.shape[0])[:, None]
    mask = jnp.zeros((flat.shape[0], EXPERTS)).at[rows, ids].set(weights)
    gate = jnp.einsum("td,edm->etm", flat, moe.w_gate[...])
    up = jnp.einsum("td,edm->etm", flat, moe.w_up[...])
    out = jnp.einsum("etm,emd->etd", jax.nn.silu(gate) * up, moe.w_down[...])
    return jnp.einsum("etd,te->td", out, mask).reshape(x.shape)


def test_routing_is_unequal_with_idle_experts() -> None:
    counts = np.bincount(picks(block(), X)[1].reshape(-1), minlength=EXPERTS)
    assert counts[6] == counts[7] == 0 and len(set(counts[:6].tolist())) > 2, counts


@pytest.mark.parametrize("impl", ["ragged", "blocks"])
def test_dropless_equals_the_dense_reference_values_and_gradients(impl: str) -> None:
    moe = block(dataclasses.replace(MOE, moe=dataclasses.replace(MOE.moe, impl=impl)))
    graphdef, params = nnx.split(moe)

    def loss(p: nnx.State, f: object) -> jax.Array:
        m = nnx.merge(graphdef, p)
        return jnp.sum(jnp.sin(f(m, X)))  # type: ignore[operator]

    ours = lambda m, x: m(x)  # noqa: E731
    # Each output is a sum over emb_dim and mlp_dim terms; the reference adds the same terms
    # plus exact zeros in another order: float32 rounding of ~(16 + 12) * 2 terms apart.
    terms = 2 * (TINY.emb_dim + 12)
    assert_equal_to_rounding(moe(X), dense_reference(moe, X), terms, "outputs")
    grad = jax.jit(jax.grad(loss), static_argnums=1)
    g_ours, g_ref = grad(params, ours), grad(params, dense_reference)
    assert_equal_to_rounding(g_ours, g_ref, terms * X.shape[1] * 2, "gradients")


def test_capacity_with_room_for_all_equals_dropless() -> None:
    moe = block()
    full = block(dataclasses.replace(MOE, moe=dataclasses.replace(MOE.moe, capacity_factor=4.0)))
    np.testing.assert_allclose(full(X), moe(X), rtol=1e-6, atol=1e-6)
    assert float(layer_stats(full)["dropped"]) == 0


def test_small_capacity_drops_the_pairs_past_each_experts_capacity() -> None:
    factor = 0.5  # capacity = ceil(0.5 * 24 * 2 / 8) = 3 pairs per expert
    cfg = dataclasses.replace(MOE, moe=dataclasses.replace(MOE.moe, capacity_factor=factor))
    moe = block(cfg)
    ids = np.asarray(picks(moe, X)[1])
    keep = np.zeros(ids.shape, bool)
    seen = np.zeros(EXPERTS, int)
    for t, j in np.ndindex(*ids.shape):  # token order, then the token's k picks
        keep[t, j] = seen[ids[t, j]] < 3
        seen[ids[t, j]] += 1
    assert 0 < (~keep).sum() < keep.size
    out = moe(X)
    assert float(layer_stats(moe)["dropped"]) == (~keep).sum()
    np.testing.assert_allclose(out, dense_reference(moe, X, keep), rtol=1e-5, atol=1e-5)


def test_router_statistics_and_load_balancing_loss() -> None:
    moe = block()
    moe(X)
    stats = layer_stats(moe)
    ids = np.asarray(picks(moe, X)[1])
    counts = np.bincount(ids.reshape(-1), minlength=EXPERTS)
    np.testing.assert_array_equal(stats["counts"], counts)
    probs = jax.nn.softmax(X.reshape(-1, TINY.emb_dim) @ moe.router[...], axis=-1)
    losses = aux_losses(jax.tree.map(lambda a: a[None], stats), EXPERTS)
    # Switch Transformer's loss: experts * sum_e (assignments_e / tokens) * mean prob_e
    expected = EXPERTS * np.sum(counts / 24 * np.asarray(probs).mean(0))
    np.testing.assert_allclose(losses["aux"], expected, rtol=1e-5)
    np.testing.assert_allclose(losses["load_max"], counts.max() / counts.mean(), rtol=1e-6)
    # the router z-loss: mean over tokens of the squared log-sum-exp of the router logits
    lse = jax.nn.logsumexp(X.reshape(-1, TINY.emb_dim) @ moe.router[...], axis=-1)
    np.testing.assert_allclose(losses["z"], np.mean(np.asarray(lse) ** 2), rtol=1e-5)
    assert float(losses["load_min"]) == 0.0
    # a mask leaves the masked tokens out of every statistic
    mask = jnp.arange(24).reshape(2, 12) % 3 != 0
    moe(X, mask)
    masked = layer_stats(moe)
    assert float(masked["rows"]) == 16
    kept = np.asarray(mask).reshape(-1)
    np.testing.assert_array_equal(masked["counts"], np.bincount(ids[kept].reshape(-1), minlength=8))


@pytest.mark.parametrize(
    ("moe", "key"),
    [
        (MoeConfig(experts=1), "model.moe.experts"),
        (MoeConfig(experts=4, top_k=5), "model.moe.top_k"),
        (MoeConfig(experts=4, mlp_dim=-1), "model.moe.mlp_dim"),
        (MoeConfig(experts=4, capacity_factor=-1.0), "model.moe.capacity_factor"),
        (MoeConfig(experts=4, aux_loss_coef=float("nan")), "model.moe.aux_loss_coef"),
        (MoeConfig(experts=4, impl="megablox"), "model.moe.impl"),
        (MoeConfig(experts=4, mlp_only_layers=(4,)), "model.moe.mlp_only_layers"),
        (MoeConfig(experts=4, mlp_only_layers=(True,)), "model.moe.mlp_only_layers"),
        (MoeConfig(experts=4, decoder_sparse_step=0), "model.moe.decoder_sparse_step"),
    ],
)
def test_bad_moe_settings_are_one_line_errors(moe: MoeConfig, key: str) -> None:
    with pytest.raises(ConfigError) as e:
        validate_model(dataclasses.replace(TINY, moe=moe))
    assert e.value.key == key and "Fix:" in str(e.value) and "\n" not in str(e.value)


def test_auto_grouped_matmul_is_tiles_on_cpu_and_ragged_dot_on_accelerators() -> None:
    from nnxtrain.model import resolve_auto

    picked = {p: resolve_auto(MOE, p).moe.impl for p in ("cpu", "tpu", "gpu")}
    assert picked == {"cpu": "blocks", "tpu": "ragged", "gpu": "ragged"}


# Dense layers between sparse ones (Qwen3-MoE's mlp_only_layers, decoder_sparse_step):
# layer 1 dense, 0 and 2 with experts; and Gemma's sliding/global flags, which each
# run of layers must slice alike.
MIXED = dataclasses.replace(
    MOE,
    num_layers=3,
    sliding_window=3,
    global_every=2,
    init_std=0.3,
    moe=dataclasses.replace(MOE.moe, mlp_only_layers=(1,), decoder_sparse_step=1),
)


def test_dense_layers_between_sparse_ones_scanned_unrolled_and_cached() -> None:
    """Two stacks, `layers` (2 with experts) and `dense_layers` (1), run in three slices:
    scanned equals unrolled (logits, and router statistics of the sparse layers only), and
    the KV cache, filled in slices too, gives the plain forward's logits. (Gradients, on 8
    devices against one, and logits against transformers' Qwen3-MoE: tests/interop.)"""
    assert layer_plan(MIXED) == (("layers", 0), ("dense_layers", 0), ("layers", 1))
    toks = jax.random.randint(jax.random.key(2), (2, 12), 0, MIXED.vocab_size)
    out = {}
    for scan in (False, True):
        model = Transformer(dataclasses.replace(MIXED, scan_layers=scan), rngs=nnx.Rngs(0))
        assert isinstance(model.dense_layers.mlp, MLP) and isinstance(model.layers.mlp, MoE)

        def forward(m: Transformer) -> tuple[jax.Array, dict]:
            x, stats = m.routed_hidden(toks)
            return m.logits(x), stats

        out[scan] = nnx.jit(forward)(model)
        assert out[scan][1]["counts"].shape == (2, EXPERTS)
    (a, sa), (b, sb) = out[False], out[True]
    np.testing.assert_array_equal(sa["counts"], sb["counts"])
    # the same sums, fused differently in the two forms: float32 rounding apart
    assert_equal_to_rounding(b, a, 2 * (TINY.emb_dim + TINY.mlp_dim), "logits")
    # a prefill of 6, then 6 steps of one token, past the window of 3 on the sliding layers
    cache = KVCache.empty(model.cfg, batch=2, length=12, dtype=jnp.float32)
    step = nnx.jit(lambda m, t, p, c: m(t, p, cache=c))
    steps = []
    for lo, hi in ((0, 6), *((t, t + 1) for t in range(6, 12))):
        positions = jnp.broadcast_to(jnp.arange(lo, hi), (2, hi - lo))
        logits, cache = step(model, toks[:, lo:hi], positions, cache)
        steps.append(logits)
    assert_equal_to_rounding(jnp.concatenate(steps, 1), b, 2 * TINY.emb_dim * 12, "cached")
