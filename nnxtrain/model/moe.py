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
from jax.sharding import PartitionSpec

from nnxtrain.config import ModelConfig, expert_mlp_dim
from nnxtrain.model.lora import base_dtype
from nnxtrain.parallel.sharding import active_mesh, active_spec, constrain

EXPERT = "expert"  # the logical name of the experts' axis of their stacked weights
# Per layer, summed over the (masked) tokens: assignments per expert [experts], router
# probability per expert [experts], tokens, squared router log-sum-exp, dropped pairs.
ROUTER_STATS = ("counts", "probs", "rows", "z", "dropped")
STATS_NAME = "router_stats"
ACTIVATIONS = ("activation_batch", "activation_length", "activation_embed")


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
    xs: jax.Array,
    w: tuple[jax.Array, jax.Array, jax.Array],
    sizes: jax.Array,
    activation: str,
    rows: int = 0,
) -> jax.Array:
    """The experts on expert-sorted rows `xs` [pairs, embed] (group sizes `sizes`) as
    tiles: each group padded to whole tiles of one expert, one batched matmul per
    projection with each tile's expert weights. Dropless: at most experts x (tile - 1)
    padding rows; the tile is half a group of even routing over `rows` pairs (all of xs
    when 0), so the padded rows are at most about twice the pairs and the tiles about
    three per expert. Rows past the groups (an all-to-all's padding) come out zero."""
    pairs, d = xs.shape
    n = w[0].shape[0]
    tile = max(8, -(-(rows or pairs) // (2 * n) // 8) * 8)
    blocks = -(-pairs // tile) + n
    padded = (sizes + tile - 1) // tile * tile
    ends = jnp.cumsum(padded)
    expert = jnp.repeat(jnp.arange(n), sizes, total_repeat_length=pairs)
    starts = jnp.cumsum(sizes) - sizes
    dest = (ends - padded)[expert] + jnp.arange(pairs) - starts[expert]
    dest = jnp.where(jnp.arange(pairs) < jnp.sum(sizes), dest, blocks * tile)  # padding: out
    buf = jnp.zeros((blocks * tile, d), xs.dtype).at[dest].set(xs, mode="drop")
    buf = buf.reshape(blocks, tile, d)
    owner = jnp.minimum(jnp.searchsorted(ends, jnp.arange(blocks) * tile, side="right"), n - 1)
    gate = jnp.einsum("btd,bdm->btm", buf, jnp.take(w[0], owner, axis=0))
    up = jnp.einsum("btd,bdm->btm", buf, jnp.take(w[1], owner, axis=0))
    h = _swiglu(gate, up, activation)
    out = jnp.einsum("btm,bmd->btd", h, jnp.take(w[2], owner, axis=0))
    return jnp.take(out.reshape(blocks * tile, d), dest, axis=0, mode="fill", fill_value=0)


def grouped(
    xs: jax.Array,
    w: tuple[jax.Array, jax.Array, jax.Array],
    sizes: jax.Array,
    activation: str,
    impl: str,
    rows: int = 0,
) -> jax.Array:
    """The SwiGLU experts on expert-sorted rows `xs` (group sizes `sizes`; rows past them
    come out zero), as `ragged_dot`s or tiles (`_blocks`)."""
    if impl == "blocks":
        return _blocks(xs, w, sizes, activation, rows)
    gate = jax.lax.ragged_dot(xs, w[0], sizes)
    up = jax.lax.ragged_dot(xs, w[1], sizes)
    return jax.lax.ragged_dot(_swiglu(gate, up, activation), w[2], sizes)


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
    ys = grouped(xs, w, sizes, activation, impl)
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
        m = jnp.ones((b, length), jnp.float32) if mask is None else mask.astype(jnp.float32)
        w = (self.w_gate[...].astype(dt), self.w_up[...].astype(dt), self.w_down[...].astype(dt))
        mesh = active_mesh()
        if mesh is not None and EXPERT in mesh.axis_names and mesh.shape[EXPERT] > 1:
            out, stats = expert_parallel(x, m, self.router[...], w, self.cfg, mesh)
        else:
            out, stats = _local(x.reshape(-1, d), m.reshape(-1), self.router[...], w, self.cfg)
            out = out.reshape(b, length, d)
        # the latest call's only (a repeated call replaces them, never accumulates)
        setattr(self, STATS_NAME, nnx.Intermediate(stats))
        return constrain(out, "moe/out", ACTIVATIONS)


def _stats(
    logits: jax.Array, probs: jax.Array, ids: jax.Array, m: jax.Array, dropped: jax.Array
) -> dict[str, jax.Array]:
    """The ROUTER_STATS of tokens with mask `m` [tokens]."""
    k = ids.shape[1]
    counts = jnp.zeros(probs.shape[1], jnp.float32).at[ids.reshape(-1)].add(jnp.repeat(m, k))
    return {
        "counts": counts,
        "probs": jnp.sum(probs * m[:, None], axis=0),
        "rows": jnp.sum(m),
        "z": jnp.sum(jax.nn.logsumexp(logits, axis=-1) ** 2 * m),
        "dropped": dropped,
    }


def _local(
    flat: jax.Array,
    m: jax.Array,
    router: jax.Array,
    w: tuple[jax.Array, jax.Array, jax.Array],
    cfg: ModelConfig,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The block on tokens [tokens, embed] whose experts all lie on this device."""
    logits, probs, weights, ids = route(flat, router, cfg.moe.top_k, cfg.moe.norm_topk_prob)
    cap = capacity(flat.shape[0], cfg)
    if cap:
        ys, kept = experts_capacity(flat, ids, w, cfg.activation, cap)
        dropped = jnp.sum(~kept).astype(jnp.float32)
    else:
        ys = experts_dropless(flat, ids, w, cfg.activation, impl_of(cfg))
        dropped = jnp.zeros((), jnp.float32)
    out = jnp.sum(ys * weights.astype(flat.dtype)[..., None], axis=1)
    return out, _stats(logits, probs, ids, m, dropped)


def _axes(part: Any) -> tuple[str, ...]:
    return (part,) if isinstance(part, str) else tuple(part or ())


def expert_parallel(
    x: jax.Array,
    m: jax.Array,
    router: jax.Array,
    w: tuple[jax.Array, jax.Array, jax.Array],
    cfg: ModelConfig,
    mesh: Any,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The block with its experts split over the mesh's `expert` axis (dropless).

    Each device routes its own tokens, sends each (token, expert) pair to the device that
    holds the expert (an all-to-all over `expert`), runs its experts on what it received
    (the grouped matmul), and sends the outputs back (a second all-to-all). The buffers
    are sized for the worst case (every pair of a device to one other), so nothing is
    dropped; the experts' weights arrive gathered over fsdp, split over tensor on their
    hidden features (the down projection's partial sums are added over tensor)."""
    x_spec = active_spec(ACTIVATIONS)
    batch_axes = _axes(x_spec[0])
    up_spec, down_spec = active_spec((EXPERT, None, "mlp")), active_spec((EXPERT, "mlp", None))
    tensor_axes = _axes(up_spec[2])
    k, impl = cfg.moe.top_k, impl_of(cfg)

    def local(
        x: jax.Array, m: jax.Array, router: jax.Array, wg: jax.Array, wu: jax.Array, wd: jax.Array
    ) -> Any:
        w = (wg, wu, wd)
        b, length, d = x.shape
        flat = x.reshape(-1, d)
        logits, probs, weights, ids = route(flat, router, k, cfg.moe.norm_topk_prob)
        ep, n_local = mesh.shape[EXPERT], w[0].shape[0]
        pairs = ids.size
        order = jnp.argsort(ids.reshape(-1), stable=True)
        sorted_ids = ids.reshape(-1)[order]
        dest = sorted_ids // n_local  # the device holding the pair's expert
        per_dest = jnp.bincount(dest, length=ep)
        rank = jnp.arange(pairs) - (jnp.cumsum(per_dest) - per_dest)[dest]
        send = jnp.zeros((ep, pairs, d), x.dtype).at[dest, rank].set(flat[order // k])
        # the pair's expert on the receiving device; n_local marks an empty slot
        send_ids = (
            jnp.full((ep, pairs), n_local, jnp.int32)
            .at[dest, rank]
            .set((sorted_ids % n_local).astype(jnp.int32))
        )
        got = jax.lax.all_to_all(send, EXPERT, 0, 0).reshape(ep * pairs, d)
        got_ids = jax.lax.all_to_all(send_ids, EXPERT, 0, 0).reshape(-1)
        by_expert = jnp.argsort(got_ids, stable=True)  # empty slots last
        sizes = jnp.bincount(got_ids, length=n_local + 1)[:n_local].astype(jnp.int32)
        ys = grouped(got[by_expert], w, sizes, cfg.activation, impl, rows=pairs)
        ys = jnp.zeros_like(ys).at[by_expert].set(ys).reshape(ep, pairs, d)
        back = jax.lax.all_to_all(ys, EXPERT, 0, 0)[dest, rank]  # pairs in sorted order
        inverse = jnp.zeros_like(order).at[order].set(jnp.arange(pairs, dtype=order.dtype))
        out = jnp.sum(back[inverse].reshape(-1, k, d) * weights.astype(x.dtype)[..., None], 1)
        if tensor_axes:
            out = jax.lax.psum(out, tensor_axes)
        stats = _stats(logits, probs, ids, m.reshape(-1), jnp.zeros((), jnp.float32))
        if batch_axes:
            stats = jax.lax.psum(stats, batch_axes)
        return out.reshape(b, length, d), stats

    run = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(
            x_spec,
            PartitionSpec(x_spec[0], x_spec[1]),
            PartitionSpec(),
            up_spec,
            up_spec,
            down_spec,
        ),
        out_specs=(x_spec, PartitionSpec()),
    )
    return run(x, m, router, *w)


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
