"""The building blocks of the Llama-style decoder: RMSNorm, rotary embeddings, grouped-query
attention (its kernels are `nnxtrain.model.attention`), the SwiGLU MLP and one decoder layer.

Parameters are stored in `param_dtype` and cast to the activation `dtype` where they are
used. Every parameter carries logical axis names (`out_sharding` metadata, see
`nnxtrain.parallel.sharding`); important activations are annotated with `constrain`.
`Attention.decode` and `DecoderLayer.decode` are generation's path over a KV cache
(`nnxtrain.model.cache`); training calls only `__call__`.
"""

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nnxtrain.config import ModelConfig
from nnxtrain.model.attention import attend
from nnxtrain.model.cache import KVCache
from nnxtrain.model.lora import Adapter, adapters, base_dtype, in_loop_cast
from nnxtrain.model.moe import MoE
from nnxtrain.parallel.sharding import constrain

BATCH, LENGTH = "activation_batch", "activation_length"


def activation_dtype(name: str) -> jnp.dtype:
    """The activation dtype; `auto` is float32 on CPU (bfloat16 is slower there), else bf16."""
    if name == "auto":
        name = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    return jnp.dtype(name)


def param(
    rngs: nnx.Rngs,
    shape: tuple[int, ...],
    names: tuple[str, ...],
    dtype: jnp.dtype,
    init: Callable[..., jax.Array],
) -> nnx.Param:
    """A parameter with logical axis names; sharding is applied later by the trainer."""
    return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=names, eager_sharding=False)


def project(x: jax.Array, w: jax.Array, n_in: int = 1) -> jax.Array:
    """x [..., *in] times w [*in, *out] -> [..., *out], as one 2-D matmul.

    Flattening first is the same math; XLA's CPU backend runs the backward of 2-D matmuls
    about twice as fast as that of the equivalent 3-D einsums (measured), and accelerators
    do not care.
    """
    k = math.prod(w.shape[:n_in])
    lead, out = x.shape[: x.ndim - n_in], w.shape[n_in:]
    y = x.reshape(-1, k) @ w.reshape(k, -1)
    return y.reshape(*lead, *out)


def weight(w: nnx.Param, dtype: jnp.dtype, frozen: bool) -> jax.Array:
    """A projection's weight in the activation dtype; `frozen` for a LoRA run's base, which
    is cast inside the layer loop (`in_loop_cast`: no cast copy of the whole stack)."""
    return in_loop_cast(w[...], dtype) if frozen else w[...].astype(dtype)


def adapted(adapter: Adapter | None, x: jax.Array, y: jax.Array) -> jax.Array:
    """`y = x W` with the LoRA update of `adapter` added (`y` itself without one)."""
    return y if adapter is None else adapter(x, y)


class RMSNorm(nnx.Module):
    """Root-mean-square normalisation with a learned scale, computed in float32."""

    def __init__(
        self, dim: int, eps: float, param_dtype: jnp.dtype, *, rngs: nnx.Rngs, offset: float = 0.0
    ):
        # Gemma scales by (1 + w): its w starts at 0, so that the scale starts at 1 too
        init = nnx.initializers.constant(1.0 - offset)
        self.scale = param(rngs, (dim,), ("norm",), param_dtype, init)
        self.eps, self.offset = eps, offset

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        scale = self.scale[...].astype(jnp.float32)
        if self.offset:
            scale = scale + self.offset
        return (y * scale).astype(x.dtype)


def local_rotary_frequencies(cfg: ModelConfig) -> tuple[float, ...]:
    """The frequencies of sliding-window layers: base `rope_local_theta`, unscaled (Gemma 3);
    those of every layer when it is 0."""
    if not cfg.rope_local_theta:
        return rotary_frequencies(cfg)
    local = dataclasses.replace(cfg, rope_theta=cfg.rope_local_theta, rope_scaling="none")
    return rotary_frequencies(local)


def rotary_frequencies(cfg: ModelConfig) -> tuple[float, ...]:
    """The head_dim/2 rotary inverse frequencies, with `cfg.rope_scaling` applied.

    Computed in float32 with the same operations as Hugging Face's rope initialisers
    (default, `linear`, `llama3`), so that imported checkpoints rotate alike; a tuple of
    floats, so that a module can hold it as a constant.
    """
    f32 = np.float32
    dim = cfg.head_dim
    inv_freq = f32(1.0) / (f32(cfg.rope_theta) ** (np.arange(0, dim, 2).astype(f32) / f32(dim)))
    factor = f32(cfg.rope_factor)
    if cfg.rope_scaling == "linear":
        inv_freq = inv_freq / factor
    elif cfg.rope_scaling == "llama3":
        low, high = f32(cfg.rope_low_freq_factor), f32(cfg.rope_high_freq_factor)
        old_len = f32(cfg.rope_original_max_len)
        wavelen = f32(2 * math.pi) / inv_freq
        # Long wavelengths are stretched by factor, short ones kept, the band between blended.
        scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (f32(1) - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
        inv_freq = np.where(medium, blended, scaled)
    return tuple(float(f) for f in inv_freq.astype(f32))


def apply_rotary(
    x: jax.Array, positions: jax.Array, inv_freq: tuple[float, ...], freqs: jax.Array | None = None
) -> jax.Array:
    """Rotates feature pairs (i, i + d/2) of x [batch, length, heads, d] by position angles
    (`rotary_frequencies` gives inv_freq; `freqs`, an array, replaces it when given)."""
    if freqs is None:
        freqs = jnp.asarray(np.asarray(inv_freq, np.float32))
    angles = positions.astype(jnp.float32)[..., None] * freqs  # [batch, length, half]
    sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


class Attention(nnx.Module):
    """Causal grouped-query self-attention with rotary position embeddings."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        pdt, init = base_dtype(cfg), nnx.initializers.normal(cfg.init_std)
        e, h, kv, d = cfg.emb_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.wq = param(rngs, (e, h, d), ("embed", "q_heads", "kv"), pdt, init)
        self.wk = param(rngs, (e, kv, d), ("embed", "kv_heads", "kv_head_dim"), pdt, init)
        self.wv = param(rngs, (e, kv, d), ("embed", "kv_heads", "kv_head_dim"), pdt, init)
        self.wo = param(rngs, (h, d, e), ("heads", "kv", "embed"), pdt, init)
        kv_names = ("kv_heads", "kv_head_dim")
        lora = adapters(
            cfg,
            {
                "q_proj": (((e,), (h, d)), (("embed",), ("q_heads", "kv"))),
                "k_proj": (((e,), (kv, d)), (("embed",), kv_names)),
                "v_proj": (((e,), (kv, d)), (("embed",), kv_names)),
                "o_proj": (((h, d), (e,)), (("heads", "kv"), ("embed",))),
            },
            rngs,
        )
        self.q_lora, self.k_lora = lora["q_proj"], lora["k_proj"]
        self.v_lora, self.o_lora = lora["v_proj"], lora["o_proj"]
        self.frozen = cfg.lora.rank > 0  # a LoRA run's base: no gradient (see `weight`)
        zeros = nnx.initializers.zeros
        if cfg.qkv_bias:  # Qwen2: q, k and v carry a bias, o does not
            self.bq = param(rngs, (h, d), ("q_heads", "kv"), pdt, zeros)
            self.bk = param(rngs, (kv, d), ("kv_heads", "kv_head_dim"), pdt, zeros)
            self.bv = param(rngs, (kv, d), ("kv_heads", "kv_head_dim"), pdt, zeros)
        if cfg.qk_norm:  # Qwen3: each head's q and k normed over head_dim, before RoPE
            self.q_norm = RMSNorm(d, cfg.norm_eps, pdt, rngs=rngs, offset=cfg.norm_offset)
            self.k_norm = RMSNorm(d, cfg.norm_eps, pdt, rngs=rngs, offset=cfg.norm_offset)
        self.qkv_bias, self.qk_norm = cfg.qkv_bias, cfg.qk_norm
        self.window = cfg.sliding_window
        # Gemma: a window on some layers only (a per-layer flag, see Transformer._layers)
        self.mixed = bool(cfg.sliding_window and cfg.global_every)
        self.local_freq = local_rotary_frequencies(cfg)
        self.scale = cfg.attn_scale or None
        self.softcap = cfg.attn_softcap
        self.inv_freq = rotary_frequencies(cfg)
        # auto: batched matmuls on CPU (measured faster there), JAX's fused kernel elsewhere
        # (cuDNN flash attention on GPU when the shapes allow it). A run that knows its
        # target platform resolves auto before the model is built (`resolve_auto`).
        cpu = jax.default_backend() == "cpu"
        self.impl = "matmul" if cfg.attention == "auto" and cpu else cfg.attention
        if self.softcap:  # a cap of the scores only the matmul kernel takes (Gemma 2)
            self.impl = "matmul"

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        segment_ids: jax.Array | None = None,
        local: jax.Array | None = None,
    ) -> jax.Array:
        q, k, v = self._qkv(x, positions, local)
        if self.mixed and local is not None and self.impl != "matmul":
            # The fused kernels take a static mask: one call for each kind of layer, and
            # the layer's flag picks which runs (the matmul kernel takes the window traced).
            def kernel(window: int) -> Callable[..., jax.Array]:
                return lambda q, k, v: attend(self.impl, q, k, v, segment_ids, window, self.scale)

            return self._out(jax.lax.cond(local, kernel(self.window), kernel(0), q, k, v))
        window = self._window(local)
        return self._out(attend(self.impl, q, k, v, segment_ids, window, self.scale, self.softcap))

    def _window(self, local: jax.Array | None) -> jax.Array | int:
        """The window of this layer: the static one, or in a mixed stack (Gemma) the window
        where the layer's flag `local` is set, else 0 (all keys)."""
        if not self.mixed or local is None:
            return self.window
        return jnp.where(local, self.window, 0)

    def decode(
        self,
        x: jax.Array,
        positions: jax.Array,
        cache: KVCache,
        layer: jax.Array | int,
        local: jax.Array | bool | None = None,
    ) -> tuple[jax.Array, KVCache]:
        """Generation's path: attends over the cached keys and this chunk's (positions
        consecutive per row), and writes the chunk's keys and values into the cache;
        `layer` is the layer's index among its kind (`cache.stack_index`)."""
        q, k, v = self._qkv(x, positions, local)
        out, cache = cache.attend(
            q, k, v, positions, layer, local, self.window, self.scale, self.softcap
        )
        return self._out(out), cache

    def _qkv(
        self, x: jax.Array, positions: jax.Array, local: jax.Array | bool | None = None
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        dt, fz = x.dtype, self.frozen
        q = adapted(self.q_lora, x, project(x, weight(self.wq, dt, fz)))  # [b, l, heads, d]
        k = adapted(self.k_lora, x, project(x, weight(self.wk, dt, fz)))
        v = adapted(self.v_lora, x, project(x, weight(self.wv, dt, fz)))
        if self.qkv_bias:
            q, k, v = (
                q + self.bq[...].astype(dt),
                k + self.bk[...].astype(dt),
                v + self.bv[...].astype(dt),
            )
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = constrain(q, "attention/q", (BATCH, LENGTH, "activation_heads", "activation_kv"))
        k = constrain(k, "attention/k", (BATCH, LENGTH, "activation_kv_heads", "activation_kv"))
        v = constrain(v, "attention/v", (BATCH, LENGTH, "activation_kv_heads", "activation_kv"))
        freqs = None
        if self.mixed and local is not None and self.local_freq != self.inv_freq:
            glob, loc = (
                jnp.asarray(np.asarray(f, np.float32)) for f in (self.inv_freq, self.local_freq)
            )
            freqs = jnp.where(local, loc, glob)
        q = apply_rotary(q, positions, self.inv_freq, freqs)
        k = apply_rotary(k, positions, self.inv_freq, freqs)
        return q, k, v

    def _out(self, out: jax.Array) -> jax.Array:
        out = constrain(out, "attention/out", (BATCH, LENGTH, "activation_heads", "activation_kv"))
        wo = weight(self.wo, out.dtype, self.frozen)
        return adapted(self.o_lora, out, project(out, wo, n_in=2))


class MLP(nnx.Module):
    """SwiGLU feed-forward: silu(x W_gate) * (x W_up), projected back by W_down."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        pdt, init = base_dtype(cfg), nnx.initializers.normal(cfg.init_std)
        e, m = cfg.emb_dim, cfg.mlp_dim
        self.w_gate = param(rngs, (e, m), ("embed", "mlp"), pdt, init)
        self.w_up = param(rngs, (e, m), ("embed", "mlp"), pdt, init)
        self.w_down = param(rngs, (m, e), ("mlp", "embed"), pdt, init)
        up = (((e,), (m,)), (("embed",), ("mlp",)))
        lora = adapters(
            cfg,
            {"gate_proj": up, "up_proj": up, "down_proj": (((m,), (e,)), (("mlp",), ("embed",)))},
            rngs,
        )
        self.gate_lora, self.up_lora, self.down_lora = (
            lora["gate_proj"],
            lora["up_proj"],
            lora["down_proj"],
        )
        self.activation = cfg.activation
        self.frozen = cfg.lora.rank > 0  # a LoRA run's base: no gradient (see `weight`)

    def __call__(self, x: jax.Array) -> jax.Array:
        dt, fz = x.dtype, self.frozen
        gate = adapted(self.gate_lora, x, project(x, weight(self.w_gate, dt, fz)))
        if self.activation == "gelu_tanh":  # Gemma's GeGLU: HF's gelu_pytorch_tanh
            gate = jax.nn.gelu(gate, approximate=True)
        else:
            gate = jax.nn.silu(gate)
        hidden = constrain(
            gate * adapted(self.up_lora, x, project(x, weight(self.w_up, dt, fz))),
            "mlp/hidden",
            (BATCH, LENGTH, "activation_mlp"),
        )
        return adapted(self.down_lora, hidden, project(hidden, weight(self.w_down, dt, fz)))


class DecoderLayer(nnx.Module):
    """Pre-norm attention and pre-norm MLP, each with a residual connection."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dense: bool = False):
        pdt, off = base_dtype(cfg), cfg.norm_offset
        self.attn_norm = RMSNorm(cfg.emb_dim, cfg.norm_eps, pdt, rngs=rngs, offset=off)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.emb_dim, cfg.norm_eps, pdt, rngs=rngs, offset=off)
        # routed experts in place of the MLP with model.moe.experts (model/moe.py), except
        # in a mixture's dense layers (model.moe.mlp_only_layers, decoder_sparse_step)
        self.mlp = MoE(cfg, rngs=rngs) if cfg.moe.experts and not dense else MLP(cfg, rngs=rngs)
        self.sandwich = cfg.sandwich_norms
        if cfg.sandwich_norms:  # Gemma: each branch's output is normed before the residual
            self.attn_post_norm = RMSNorm(cfg.emb_dim, cfg.norm_eps, pdt, rngs=rngs, offset=off)
            self.mlp_post_norm = RMSNorm(cfg.emb_dim, cfg.norm_eps, pdt, rngs=rngs, offset=off)

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        segment_ids: jax.Array | None = None,
        local: jax.Array | None = None,
    ) -> jax.Array:
        attended = self.attn(self.attn_norm(x), positions, segment_ids, local)
        x = x + (self.attn_post_norm(attended) if self.sandwich else attended)
        x = x + self._mlp(x, segment_ids)
        return constrain(x, "layer/residual", (BATCH, LENGTH, "activation_embed"))

    def _mlp(self, x: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
        h = self.mlp_norm(x)
        # the router's statistics count real tokens only (segment id 0: padding)
        mlp = self.mlp
        out = (
            mlp(h, segment_ids != 0) if isinstance(mlp, MoE) and segment_ids is not None else mlp(h)
        )
        return self.mlp_post_norm(out) if self.sandwich else out

    def decode(
        self,
        x: jax.Array,
        positions: jax.Array,
        cache: KVCache,
        layer: jax.Array | int,
        local: jax.Array | bool | None = None,
    ) -> tuple[jax.Array, KVCache]:
        """The same layer over the KV cache (generation; see `Attention.decode`)."""
        attended, cache = self.attn.decode(self.attn_norm(x), positions, cache, layer, local)
        x = x + (self.attn_post_norm(attended) if self.sandwich else attended)
        x = x + self._mlp(x)
        return constrain(x, "layer/residual", (BATCH, LENGTH, "activation_embed")), cache
