"""The mixture-of-experts feed-forward block: a router picks `top_k` of `experts` SwiGLU
experts per token, and the token's output is their outputs weighted by the router.

    router logits = x W_router                    (no bias; W_router [embed, experts])
    p             = softmax(logits) in float32
    w, e          = top_k(p)                       (renormalised to sum 1: norm_topk_prob)
    y             = sum_j w_j * expert_{e_j}(x)    (expert: silu(x Wg) * (x Wu), then Wd)

as Mixtral and Qwen3-MoE compute it in transformers. The experts' weights are stacked on
a leading `expert` axis ([experts, embed, mlp], [experts, mlp, embed]).

Compute (`model.moe.capacity_factor`): dropless by default. The (token, expert) pairs are
sorted by expert and each projection is one grouped matmul over the groups: every pair
computed once, none dropped, no expert computed for a token it was not given. The grouped
matmul (`model.moe.impl`) is `jax.lax.ragged_dot` on accelerators; on CPU, where JAX
lowers ragged_dot to a dense product over every group (as slow as computing every expert),
expert-sorted tiles and one batched matmul (`_blocks`).

With a capacity factor > 0, each expert takes at most
`capacity = ceil(factor * tokens * top_k / experts)` pairs, in token order, into a dense
[experts, capacity, embed] buffer (one batched matmul, static shapes); pairs past the
capacity are dropped (they add nothing) and counted.

Each call keeps the router's statistics (`ROUTER_STATS`, sums over the tokens of the mask)
on the block as an `nnx.Intermediate`; the decoder takes them out of each layer
(`layer_stats`) and returns them stacked per layer (`Transformer.routed_hidden`), and the
training loss adds the load-balancing loss exactly as transformers'
`load_balancing_loss_func` computes it (`aux_losses`), and the optional router z-loss.
"""

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from nnxtrain.config import ModelConfig, expert_mlp_dim
from nnxtrain.model.lora import base_dtype
from nnxtrain.parallel.sharding import constrain

EXPERT = "expert"  # the logical name of the experts' axis of their stacked weights
# Per layer, summed over the (masked) tokens: assignments per expert [experts], router
# probability per expert [experts], tokens, squared router log-sum-exp, dropped pairs.
ROUTER_STATS = ("counts", "probs", "rows", "z", "dropped")
STATS_NAME = "router_stats"


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], names: tuple[Any, ...], cfg: ModelConfig):
    init = nnx.initializers.normal(cfg.init_std)
    value = init(rngs.params(), shape, base_dtype(cfg))
    return nnx.Param(value, out_sharding=names, eager_sharding=False)


def capacity(tokens: int, cfg: ModelConfig) -> int:
    """The pairs each expert takes in capacity mode (0: dropless)."""
    moe = cfg.moe
    if not moe.capacity_factor:
        return 0
    return max(1, math.ceil(moe.capacity_factor * tokens * moe.top_k / moe.experts))


def route(
    x: jax.Array, router: jax.Array, top_k: int, norm_topk_prob: bool
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(router logits [tokens, experts] float32, probabilities, top-k weights [tokens, k]
    float32, top-k expert ids [tokens, k]) of tokens x [tokens, embed]."""
    logits = (x @ router.astype(x.dtype)).astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    weights, ids = jax.lax.top_k(probs, top_k)
    if norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return logits, probs, weights, ids


def _swiglu(gate: jax.Array, up: jax.Array, activation: str) -> jax.Array:
    act = jax.nn.gelu(gate, approximate=True) if activation == "gelu_tanh" else jax.nn.silu(gate)
    return act * up


def impl_of(cfg: ModelConfig) -> str:
    """The dropless grouped matmul `model.moe.impl` names (`auto`: by JAX's backend; a run
    compiled for other devices resolves it first, `nnxtrain.model.resolve_auto`)."""
    impl = cfg.moe.impl
    if impl == "auto":
        return "blocks" if jax.default_backend() == "cpu" else "ragged"
    return impl


def _blocks(
    xs: jax.Array, w: tuple[jax.Array, jax.Array, jax.Array], sizes: jax.Array, activation: str
) -> jax.Array:
    """The experts on expert-sorted rows `xs` [pairs, embed] (group sizes `sizes`) as
    tiles: each group padded to whole tiles of one expert, one batched matmul per
    projection with each tile's expert weights. Dropless: at most experts x (tile - 1)
    padding rows; the tile is half a group of even routing, so the padded rows are at most
    about twice the pairs and the tiles about three per expert."""
    pairs, d = xs.shape
    n = w[0].shape[0]
    tile = max(8, -(-pairs // (2 * n) // 8) * 8)
    blocks = -(-pairs // tile) + n
    padded = (sizes + tile - 1) // tile * tile
    ends = jnp.cumsum(padded)
    expert = jnp.repeat(jnp.arange(n), sizes, total_repeat_length=pairs)
    starts = jnp.cumsum(sizes) - sizes
    dest = (ends - padded)[expert] + jnp.arange(pairs) - starts[expert]
    buf = jnp.zeros((blocks * tile, d), xs.dtype).at[dest].set(xs).reshape(blocks, tile, d)
    owner = jnp.minimum(jnp.searchsorted(ends, jnp.arange(blocks) * tile, side="right"), n - 1)
    gate = jnp.einsum("btd,bdm->btm", buf, jnp.take(w[0], owner, axis=0))
    up = jnp.einsum("btd,bdm->btm", buf, jnp.take(w[1], owner, axis=0))
    h = _swiglu(gate, up, activation)
    out = jnp.einsum("btm,bmd->btd", h, jnp.take(w[2], owner, axis=0))
    return jnp.take(out.reshape(blocks * tile, d), dest, axis=0)


def experts_dropless(
    x: jax.Array,
    ids: jax.Array,
    w: tuple[jax.Array, jax.Array, jax.Array],
    activation: str,
    impl: str = "ragged",
) -> jax.Array:
    """Every (token, expert) pair's expert output [tokens, k, embed], dropless: the pairs
    sorted by expert, then one grouped matmul per projection over the experts' groups,
    `ragged_dot` or tiles (`_blocks`)."""
    tokens, k = ids.shape
    n = w[0].shape[0]
    flat = ids.reshape(-1)
    order = jnp.argsort(flat, stable=True)  # pairs by expert, in token order within each
    sizes = jnp.bincount(flat, length=n).astype(jnp.int32)
    xs = jnp.take(x, order // k, axis=0)
    if impl == "blocks":
        ys = _blocks(xs, w, sizes, activation)
    else:
        gate = jax.lax.ragged_dot(xs, w[0], sizes)
        up = jax.lax.ragged_dot(xs, w[1], sizes)
        ys = jax.lax.ragged_dot(_swiglu(gate, up, activation), w[2], sizes)
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.size, dtype=order.dtype))
    return jnp.take(ys, inverse, axis=0).reshape(tokens, k, -1)


def experts_capacity(
    x: jax.Array,
    ids: jax.Array,
    w: tuple[jax.Array, jax.Array, jax.Array],
    activation: str,
    cap: int,
) -> tuple[jax.Array, jax.Array]:
    """(every pair's expert output [tokens, k, embed], zero where dropped; whether each
    pair was kept [tokens, k]): each expert takes its first `cap` pairs in token order
    into an [experts, cap, embed] buffer, computed as one batched matmul per projection."""
    tokens, k = ids.shape
    n, d = w[0].shape[0], x.shape[-1]
    flat = ids.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    sizes = jnp.bincount(flat, length=n)
    sorted_ids = flat[order]
    rank = jnp.arange(flat.size) - (jnp.cumsum(sizes) - sizes)[sorted_ids]
    kept_sorted = rank < cap
    slot = jnp.where(kept_sorted, sorted_ids * cap + rank, n * cap)  # n * cap: the bin
    xs = jnp.take(x, order // k, axis=0)
    buf = jnp.zeros((n * cap + 1, d), x.dtype).at[slot].set(xs)[:-1].reshape(n, cap, d)
    gate = jnp.einsum("ecd,edm->ecm", buf, w[0])
    up = jnp.einsum("ecd,edm->ecm", buf, w[1])
    out = jnp.einsum("ecm,emd->ecd", _swiglu(gate, up, activation), w[2])
    out = jnp.concatenate([out.reshape(n * cap, d), jnp.zeros((1, d), out.dtype)])
    ys = jnp.take(out, slot, axis=0)
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.size, dtype=order.dtype))
    kept = jnp.take(kept_sorted, inverse).reshape(tokens, k)
    return jnp.take(ys, inverse, axis=0).reshape(tokens, k, d), kept


class MoE(nnx.Module):
    """Routed SwiGLU experts in place of the MLP (see the module docstring)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        n, e, m = cfg.moe.experts, cfg.emb_dim, expert_mlp_dim(cfg)
        self.router = _param(rngs, (e, n), ("embed", None), cfg)
        self.w_gate = _param(rngs, (n, e, m), (EXPERT, "embed", "mlp"), cfg)
        self.w_up = _param(rngs, (n, e, m), (EXPERT, "embed", "mlp"), cfg)
        self.w_down = _param(rngs, (n, m, e), (EXPERT, "mlp", "embed"), cfg)
        self.top_k, self.norm_topk_prob = cfg.moe.top_k, cfg.moe.norm_topk_prob
        self.activation, self.cfg = cfg.activation, cfg

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """x [batch, length, embed] -> [batch, length, embed]; `mask` [batch, length]
        (true: a real token) selects the tokens the router's statistics count."""
        b, length, d = x.shape
        dt = x.dtype
        flat = x.reshape(-1, d)
        logits, probs, weights, ids = route(flat, self.router[...], self.top_k, self.norm_topk_prob)
        w = (self.w_gate[...].astype(dt), self.w_up[...].astype(dt), self.w_down[...].astype(dt))
        cap = capacity(flat.shape[0], self.cfg)
        if cap:
            ys, kept = experts_capacity(flat, ids, w, self.activation, cap)
            dropped = jnp.sum(~kept).astype(jnp.float32)
        else:
            ys = experts_dropless(flat, ids, w, self.activation, impl_of(self.cfg))
            dropped = jnp.zeros((), jnp.float32)
        out = jnp.sum(ys * weights.astype(dt)[..., None], axis=1).reshape(b, length, d)
        m = jnp.ones(flat.shape[0], jnp.float32) if mask is None else mask.reshape(-1)
        m = m.astype(jnp.float32)
        stats = {
            "counts": jnp.zeros(probs.shape[1], jnp.float32)
            .at[ids.reshape(-1)]
            .add(jnp.repeat(m, self.top_k)),
            "probs": jnp.sum(probs * m[:, None], axis=0),
            "rows": jnp.sum(m),
            "z": jnp.sum(jax.nn.logsumexp(logits, axis=-1) ** 2 * m),
            "dropped": dropped,
        }
        # the latest call's only (a repeated call replaces them, never accumulates)
        setattr(self, STATS_NAME, nnx.Intermediate(stats))
        return constrain(
            out, "moe/out", ("activation_batch", "activation_length", "activation_embed")
        )


def layer_stats(layer: nnx.Module) -> dict[str, jax.Array] | None:
    """The router statistics a layer's MoE sowed in its last call (taken out of it), or
    None for a dense layer."""
    popped = nnx.pop(layer, nnx.Intermediate)
    found = [v for p, v in nnx.to_flat_state(popped) if p[-1] == STATS_NAME]
    if not found:
        return None
    return found[0].get_value()


def aux_losses(stats: dict[str, jax.Array], experts: int) -> dict[str, jax.Array]:
    """From per-layer statistics (each leaf [layers, ...]): the load-balancing loss as
    transformers' `load_balancing_loss_func` computes it over all layers' tokens
    (experts * sum_e f_e P_e, f_e: share of top-k assignments, P_e: mean probability),
    the router z-loss (mean squared log-sum-exp), per-layer load max and min over the
    mean (the worst layer's), and the dropped share of pairs."""
    rows = jnp.maximum(jnp.sum(stats["rows"]), 1.0)
    f = jnp.sum(stats["counts"], axis=0) / rows
    p = jnp.sum(stats["probs"], axis=0) / rows
    counts = stats["counts"]  # [layers, experts]
    mean = jnp.maximum(jnp.mean(counts, axis=-1), 1e-9)
    pairs = jnp.maximum(jnp.sum(counts), 1.0)
    return {
        "aux": experts * jnp.sum(f * p),
        "z": jnp.sum(stats["z"]) / rows,
        "load_max": jnp.max(jnp.max(counts, axis=-1) / mean),
        "load_min": jnp.min(jnp.min(counts, axis=-1) / mean),
        "dropped": jnp.sum(stats["dropped"]) / pairs,
    }
