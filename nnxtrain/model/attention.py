"""How attention is computed: causal softmax attention of q [batch, length, heads, head_dim]
over k, v [batch, length, kv_heads, head_dim], by the kernel `model.attention` names.

- `matmul` (`causal_attention`): two batched matmuls over [batch·heads]; the CPU default.
- `xla`, `cudnn` (`fused_attention`): `jax.nn.dot_product_attention` with that
  implementation (`auto`: JAX's choice).
- `splash` (`splash_attention`): the Pallas splash-attention kernel, a flash kernel for TPU
  that never holds the [length, length] scores in memory. Off TPU it runs in Pallas's
  interpret mode: the same blocks and online softmax as plain XLA ops, exact but slow.

Every kernel scales the scores by 1/sqrt(head_dim) and lets a query see the keys at or
before it; with `segment_ids` [batch, length] (documents numbered 1, 2, ...; padding 0) only
those of its own segment, so padding sees only padding; with a sliding `window` (> 0, the
`model.sliding_window` of Mistral), only the `window` latest of those, itself included.
Keys and values may have fewer
heads than queries (grouped-query attention): consecutive query heads share one.
"""

import functools
import math
import sys
from typing import Any, Literal, cast

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec

from nnxtrain.parallel.sharding import active_mesh, active_spec


def same_document(segment_ids: jax.Array) -> jax.Array:
    """[b, l, l] booleans: whether query i and key j lie in the same document (segment ids
    [b, l], as the data packs them; padding is segment 0 and sees only padding)."""
    return segment_ids[:, :, None] == segment_ids[:, None, :]


def attend(
    impl: str,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array | None,
    window: int | jax.Array = 0,
    scale: float | None = None,
    softcap: float = 0.0,
) -> jax.Array:
    """Attention by kernel `impl` (a `model.attention` value; `auto` is JAX's choice); with
    a sliding `window` (> 0), query i sees only keys j with i - j < window. `scale`
    replaces 1/sqrt(head_dim); a traced window (one per layer, Gemma) and a `softcap` of
    the scores are the matmul kernel's only (for a fused kernel the model calls it once
    per kind of layer, each with its static window, and runs a soft-cap with matmul)."""
    if impl == "matmul":
        return causal_attention(q, k, v, segment_ids, window, scale, softcap)
    assert isinstance(window, int) and not softcap, impl
    if impl == "splash":
        return splash_attention(q, k, v, segment_ids, window, scale)
    return fused_attention(q, k, v, impl, segment_ids, window, scale)


def causal_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array | None = None,
    window: int | jax.Array = 0,
    scale: float | None = None,
    softcap: float = 0.0,
) -> jax.Array:
    """Causal softmax attention as two batched matmuls over [batch * heads] (the `matmul`
    kernel). q [b, l, h, d]; k, v [b, l, kv_heads, d] with kv_heads dividing h. With
    `segment_ids` [b, l], a query also sees only keys of its own document."""
    b, length, h, d = q.shape
    k, v = (jnp.repeat(t, h // t.shape[2], axis=2) for t in (k, v))

    def heads_first(t: jax.Array) -> jax.Array:
        return t.transpose(0, 2, 1, 3).reshape(b * h, length, d)

    scores = jnp.matmul(heads_first(q), heads_first(k).transpose(0, 2, 1)) * (scale or d**-0.5)
    if softcap:  # Gemma 2: cap * tanh(scores / cap), before the mask
        scores = softcap * jnp.tanh(scores / softcap)
    mask = jnp.tril(jnp.ones((length, length), bool))
    if isinstance(window, jax.Array):  # per layer: 0 is no window
        ago = jnp.arange(length)[:, None] - jnp.arange(length)[None, :]
        mask &= (ago < window) | (window == 0)
    elif window:  # within a document index and position differences are equal
        mask &= jnp.triu(jnp.ones((length, length), bool), 1 - window)
    if segment_ids is not None:
        # The same masked scores, seen as [b, h, l, l] so one [b, 1, l, l] mask covers all
        # heads; a masked score's exp is exactly 0, so other documents add nothing at all.
        mask = (mask & same_document(segment_ids))[:, None]
        scores = scores.reshape(b, h, length, length)
    scores = jnp.where(mask, scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype).reshape(b * h, length, length)
    out = jnp.matmul(probs, heads_first(v))
    return out.reshape(b, h, length, d).transpose(0, 2, 1, 3)


_warned_cudnn_fallback = False


def fused_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    impl: str,
    segment_ids: jax.Array | None,
    window: int = 0,
    scale: float | None = None,
) -> jax.Array:
    """`jax.nn.dot_product_attention` (kernels `xla`, `cudnn`, or `auto`: JAX's choice),
    causal, and within documents when `segment_ids` are given (as a boolean mask, which
    cuDNN takes as an additive bias). Where cuDNN refuses the masked call, the `xla`
    kernel runs instead, with one warning per process."""
    global _warned_cudnn_fallback
    mask = None if segment_ids is None else same_document(segment_ids)[:, None]
    name = cast(Literal["xla", "cudnn"] | None, {"xla": "xla", "cudnn": "cudnn"}.get(impl))
    local = (window - 1, 0) if window else None  # (keys before, keys after) a query
    try:
        return jax.nn.dot_product_attention(
            q,
            k,
            v,
            mask=mask,
            scale=scale,
            is_causal=True,
            local_window_size=local,
            implementation=name,
        )
    except (ValueError, NotImplementedError, RuntimeError) as err:
        if name != "cudnn" or mask is None:
            raise
        if not _warned_cudnn_fallback:
            _warned_cudnn_fallback = True
            print(
                f"nnxtrain: warning: model.attention=cudnn cannot mask attention to documents "
                f"here ({str(err).splitlines()[0]}); the xla kernel runs instead",
                file=sys.stderr,
            )
        return jax.nn.dot_product_attention(
            q,
            k,
            v,
            mask=mask,
            scale=scale,
            is_causal=True,
            local_window_size=local,
            implementation="xla",
        )


# The kernel tiles the sequence in blocks of whole 128-lane vector registers, so lengths
# are padded to a multiple of 128; the block is the largest of these dividing the padded
# length (bigger blocks do more work per grid step; 512 is MaxText's default).
SPLASH_LANES = 128
SPLASH_BLOCKS = (512, 256, 128)

_warned_splash_interpret = False


def splash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array | None = None,
    window: int = 0,
    scale: float | None = None,
) -> jax.Array:
    """The Pallas splash-attention kernel (`splash`): causal, within documents when
    `segment_ids` are given, in interpret mode unless the devices are TPUs.

    The platform is that of the mesh the model is traced under (`use_rules`; the target's
    devices, which may be TPUs compiled for from a CPU host), else JAX's default backend.
    On a mesh the kernel runs under `shard_map`: it is one custom call, which XLA cannot
    split between devices, so each device runs it on its own examples and heads."""
    global _warned_splash_interpret
    mesh = active_mesh()
    platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
    interpret = platform != "tpu"
    if interpret and not _warned_splash_interpret:
        _warned_splash_interpret = True
        print(
            f"nnxtrain: warning: model.attention=splash is a TPU kernel; on {platform} it "
            "runs in Pallas's interpret mode (exact, but far slower than the other kernels)",
            file=sys.stderr,
        )
    local = functools.partial(_splash_on_device, interpret=interpret, window=window, scale=scale)
    if mesh is None:
        return local(q, k, v, segment_ids)
    # Examples and heads split as the model's activations are; the length stays whole on
    # each device (the kernel cannot split a sequence), so a length split is gathered.
    spec = active_spec(("activation_batch", None, "activation_heads", None))
    # k and v split over the query heads' axes, so that each device holds the kv heads its
    # query heads share. Where kv_heads do not split that many ways (MQA on a tensor-split
    # mesh), each kv head is repeated only as often as that needs, not up to all heads.
    heads_axes = (spec[2],) if isinstance(spec[2], str) else tuple(spec[2] or ())
    ways = math.prod(mesh.shape[a] for a in heads_axes)
    repeat = ways // math.gcd(k.shape[2], ways)
    if repeat > 1:
        k, v = (jnp.repeat(t, repeat, axis=2) for t in (k, v))
    # check_vma off: the kernel's pallas_call does not declare how its outputs vary
    # across devices (MaxText turns the same check off around it).
    on_mesh = functools.partial(jax.shard_map, mesh=mesh, out_specs=spec, check_vma=False)
    if segment_ids is None:
        run = on_mesh(lambda q, k, v: local(q, k, v, None), in_specs=(spec, spec, spec))
        return cast(jax.Array, run(q, k, v))
    run = on_mesh(local, in_specs=(spec, spec, spec, PartitionSpec(spec[0], None)))
    return cast(jax.Array, run(q, k, v, segment_ids))


def _splash_on_device(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array | None,
    *,
    interpret: bool,
    window: int = 0,
    scale: float | None = None,
) -> jax.Array:
    """The kernel over one device's [b, l, h, d] arrays (all of them without a mesh)."""
    _, length, h, d = q.shape
    padded = -(-length // SPLASH_LANES) * SPLASH_LANES
    # Padded keys lie after every real query, so the causal mask alone hides them (their
    # segment id does not matter); a padded query sees at least itself, so its softmax is
    # defined, and its row is cut off at the end.
    extra = padded - length
    q = q * (scale or d**-0.5)  # as the other kernels scale the scores; the kernel does not
    q, k, v = (jnp.pad(t, ((0, 0), (0, extra), (0, 0), (0, 0))) for t in (q, k, v))
    # The kernel takes one example [heads, length, head_dim]; vmap gives it the batch.
    # k and v keep their kv_heads: the kernel reads kv head i // (h / kv_heads) for query
    # head i, so grouped-query attention needs no repeated copy of k and v.
    q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
    kernel = _splash_kernel(h, padded, interpret, window)
    if segment_ids is None:
        out = jax.vmap(kernel)(q, k, v)
    else:
        seg = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, extra)))

        def one(q: jax.Array, k: jax.Array, v: jax.Array, s: jax.Array) -> Any:
            return kernel(q, k, v, segment_ids=splash.SegmentIds(q=s, kv=s))

        out = jax.vmap(one)(q, k, v, seg)
    return cast(jax.Array, out).transpose(0, 2, 1, 3)[:, :length]


def _splash_kernel(heads: int, length: int, interpret: bool, window: int = 0) -> Any:
    """The causal kernel for `heads` query heads over `length` (a multiple of 128); with a
    sliding `window`, the local mask that keeps the window-1 keys before a query and it.

    Built per trace, not cached: it holds the mask's block tables as arrays, which would
    be tracers of the trace that made them (splash caches the numpy work itself)."""
    block = next(b for b in SPLASH_BLOCKS if length % b == 0)
    sizes = splash.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    one = (
        splash.LocalMask((length, length), window_size=(window - 1, 0), offset=0)
        if window
        else splash.CausalMask((length, length))
    )
    mask = splash.MultiHeadMask([one] * heads)
    return splash.make_splash_mha(
        mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret
    )
