"""LoRA adapters: a low-rank update B A on a frozen projection, as PEFT computes it.

A targeted projection y = x W (W: `[*in, *out]`, nnxtrain's layout) becomes

    y = x W + scale * (x A) B        A: [*in, r], B: [r, *out], scale = alpha/r (or alpha/sqrt r)

A and B are `nnx.LoRAParam`s (a subclass of `nnx.Param`): the optimizer is built over them
alone (`TRAINABLE`), and the checkpoint keeps them without the base. A starts as PEFT's
Kaiming-uniform (bound 1/sqrt(fan_in)), B at zero, so that a fresh adapter adds exactly
zero and the model's first logits are the base's bit for bit. Their logical axis names are
the base weight's in-axes then `lora_rank` (A), and `lora_rank` then its out-axes (B):
on any mesh an adapter is split like the weight it adapts, its rank replicated.

Our own small module rather than flax's `nnx.LoRA` (no alpha scale, 2-D kernels of
`nnx.Linear` only, where ours are `[embed, heads, head_dim]`) or qwix (a new dependency that
rewrites the model's dot_generals by module path): see docs/lora.md.

`adapters_off(model)` is the base model as a view, for a frozen reference (preference
training): the same arrays, every adapter skipped, no second copy of the weights.
"""

import contextlib
import math
import threading
from collections.abc import Iterator
from typing import TypeVar

import jax
import jax.numpy as jnp
from flax import nnx

from nnxtrain.config import LORA_TARGETS, LoraConfig, ModelConfig, lora_targets

Shapes = tuple[tuple[int, ...], tuple[int, ...]]  # a projection's (in dims, out dims)
Names = tuple[tuple[str, ...], tuple[str, ...]]  # their logical axis names
M = TypeVar("M", bound=nnx.Module)
RANK = "lora_rank"  # the logical name of an adapter's rank axis (replicated)

# Trained in full beside the adapters with model.lora.train_embeddings.
TRAINABLE_EMBEDDINGS = ("embed", "lm_head")


def adapters_off(model: M) -> M:
    """The base model as a view of `model`: the same arrays (no copy), every adapter
    skipped. Its graph differs from `model`'s (each adapter's `on` is False), so jitted
    code traces it apart: a frozen reference model for preference training."""
    graphdef, state = nnx.split(model)
    view = nnx.merge(graphdef, state, copy=False)
    for _, node in nnx.iter_graph(view):
        if isinstance(node, Adapter):
            node.on = False
    return view


class _Dropout(threading.local):
    key: jax.Array | None = None


_dropout = _Dropout()


@contextlib.contextmanager
def lora_dropout(key: jax.Array) -> Iterator[None]:
    """Inside it, a forward traced drops adapter inputs at model.lora.dropout with masks
    drawn from `key` (the train step's, one per step); outside, no dropout (eval, generation)."""
    saved, _dropout.key = _dropout.key, key
    try:
        yield
    finally:
        _dropout.key = saved


def lora_scale(lora: LoraConfig) -> float:
    """alpha/r, or alpha/sqrt(r) with use_rslora (PEFT's `scaling`)."""
    return lora.alpha / (math.sqrt(lora.rank) if lora.use_rslora else lora.rank)


def base_dtype(cfg: ModelConfig) -> jnp.dtype:
    """The dtype of the frozen base's weights: model.lora.base_dtype, else param_dtype."""
    if cfg.lora.rank > 0 and cfg.lora.base_dtype:
        return jnp.dtype(cfg.lora.base_dtype)
    return jnp.dtype(cfg.param_dtype)


def in_loop_cast(value: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """`value.astype(dtype)`, bit for bit, done where it is used: inside the layer loop.

    With bfloat16 activations XLA prepares the scanned layers' weights outside the loop, a
    whole stack at a time, and holds that copy through the step (measured on TPU,
    docs/lora.md "Memory"): a float32 stack is converted to bfloat16, a bfloat16 stack of
    attention weights copied into the layout the loop's matmuls want. An optimization
    barrier in the loop does not stop it. A rounding to bfloat16's precision
    (`reduce_precision`: exact on bfloat16, and before a float32 -> bfloat16 convert it
    leaves the convert exact) is an op XLA keeps in the loop, so each layer's slice is
    prepared there, one at a time. For LoRA's frozen base and its adapters only: the base
    is where LoRA is meant to save the memory; a full fine-tune is left as it was.
    """
    bf16 = jnp.dtype(jnp.bfloat16)
    if jnp.dtype(dtype) == bf16 and value.dtype in (jnp.float32, bf16):
        value = jax.lax.reduce_precision(value, exponent_bits=8, mantissa_bits=7)
    return value.astype(dtype)


def trainable(cfg: ModelConfig) -> nnx.filterlib.Filter:
    """The parameters the optimizer updates (and a LoRA checkpoint keeps)."""
    if cfg.lora.rank == 0:
        return nnx.Param
    if cfg.lora.train_embeddings:
        return nnx.Any(nnx.LoRAParam, *(nnx.PathContains(n) for n in TRAINABLE_EMBEDDINGS))
    return nnx.LoRAParam


def _key(rngs: nnx.Rngs, target: str) -> jax.Array:
    """A's key, drawn beside the params stream without advancing it: the base weights of a
    model with LoRA are those of the same model and seed without it."""
    stream = rngs.params
    key = jax.random.fold_in(stream.key[...], stream.count[...])
    return jax.random.fold_in(jax.random.fold_in(key, 0x10A), LORA_TARGETS.index(target))


class Adapter(nnx.Module):
    """The low-rank update of one projection `[*in, *out]`, added to its output."""

    def __init__(
        self,
        cfg: ModelConfig,
        target: str,
        shape: Shapes,
        names: Names,
        *,
        rngs: nnx.Rngs,
    ):
        (ins, outs), (in_names, out_names), r = shape, names, cfg.lora.rank
        dtype = jnp.dtype(cfg.param_dtype)
        bound = 1.0 / math.sqrt(math.prod(ins))  # PEFT: kaiming_uniform_(a=sqrt(5))
        a = jax.random.uniform(_key(rngs, target), (*ins, r), dtype, -bound, bound)
        self.a = nnx.LoRAParam(a, out_sharding=(*in_names, RANK), eager_sharding=False)
        b = jnp.zeros((r, *outs), dtype)
        self.b = nnx.LoRAParam(b, out_sharding=(RANK, *out_names), eager_sharding=False)
        self.scale, self.rate = lora_scale(cfg.lora), cfg.lora.dropout
        self.target = LORA_TARGETS.index(target)
        self.on = True  # False in `adapters_off`'s view

    def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
        """`y` (the base projection of `x`) plus this adapter's update."""
        if not self.on:
            return y
        n_in = self.a.ndim - 1
        lead, k = x.shape[: x.ndim - n_in], math.prod(self.a.shape[:-1])
        a = in_loop_cast(self.a[...], x.dtype).reshape(k, -1)
        if self.rate > 0 and _dropout.key is not None:
            # One mask per step and projection; A's first element (its own in each layer,
            # also under scan, where the layer index is not known) sets each layer's apart.
            salt = jax.lax.bitcast_convert_type(
                self.a[...].reshape(-1)[0].astype(jnp.float32), jnp.uint32
            )
            key = jax.random.fold_in(jax.random.fold_in(_dropout.key, self.target), salt)
            keep = jax.random.bernoulli(key, 1.0 - self.rate, x.shape)
            x = jnp.where(keep, x / (1.0 - self.rate), 0).astype(x.dtype)
        b = in_loop_cast(self.b[...], x.dtype)
        delta = (x.reshape(-1, k) @ a) @ b.reshape(b.shape[0], -1)
        return y + (delta * self.scale).reshape(*lead, *b.shape[1:]).astype(y.dtype)


def adapters(
    cfg: ModelConfig,
    projections: dict[str, tuple[Shapes, Names]],
    rngs: nnx.Rngs,
) -> dict[str, Adapter | None]:
    """One Adapter per targeted projection (HF name -> (shapes, logical names)); None for
    the others, and for all of them without LoRA."""
    wanted = lora_targets(cfg.lora) if cfg.lora.rank > 0 else ()
    return {
        name: Adapter(cfg, name, shape, names, rngs=rngs) if name in wanted else None
        for name, (shape, names) in projections.items()
    }
