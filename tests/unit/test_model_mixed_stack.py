"""A stack of sliding-window and global layers (Gemma 3's pattern, `model.global_every`)
with every Gemma switch on: the layer kind rides along the scan as a per-layer flag, so the
scanned and unrolled forwards agree, a packed row equals its documents alone, and the KV
cache (prefill and one token at a time, rows at different positions) gives the plain
forward's logits, its sliding layers caching only their window. The packed and
cached cases run scanned (the flags as scan inputs); unrolled, the same code is checked
against transformers by tests/interop/test_hf_families.py (CPU unrolls by default)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from conftest import TINY, needs_libtpu
from flax import nnx

from nnxtrain.config import MeshConfig, ModelConfig
from nnxtrain.model import Transformer
from nnxtrain.model.cache import KVCache
from nnxtrain.parallel.mesh import build_mesh
from nnxtrain.parallel.sharding import DEFAULT_RULES, use_rules
from nnxtrain.parallel.target import parse_target, target_devices

# 3 layers: sliding, global, sliding (global_every 2); window 3 over rows of 12
GEMMA = dataclasses.replace(
    TINY,
    num_layers=3,
    sliding_window=3,
    global_every=2,
    rope_local_theta=100.0,
    norm_offset=1.0,
    embed_scale=True,
    activation="gelu_tanh",
    sandwich_norms=True,
    qk_norm=True,
    attn_scale=0.3,
    attn_softcap=1.5,
    final_softcap=2.0,
    init_std=0.3,  # sharp attention: a window or rotary mix-up moves the logits
)
TOL = 1e-5


def build(cfg: ModelConfig) -> Transformer:
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)  # Gemma's norm weights start at 0: make them differ
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    for path, var in flat:
        if path[-1] == "scale":
            var.set_value(jnp.asarray(rng.uniform(-0.5, 0.5, var.get_value().shape), jnp.float32))
    nnx.update(model, nnx.from_flat_state(flat))
    return model


def row(length: int = 12, seed: int = 1) -> jnp.ndarray:
    return jnp.asarray(np.random.default_rng(seed).integers(1, TINY.vocab_size, (1, length)))


def test_scanned_equals_unrolled_and_the_window_matters():
    toks = row()
    unrolled = build(dataclasses.replace(GEMMA, scan_layers=False))(toks)
    scanned = build(dataclasses.replace(GEMMA, scan_layers=True))(toks)
    np.testing.assert_allclose(scanned, unrolled, atol=TOL, rtol=0)
    all_global = build(
        dataclasses.replace(GEMMA, scan_layers=True, global_every=0, sliding_window=0)
    )
    assert float(jnp.max(jnp.abs(all_global(toks) - unrolled))) > 1e-3


def test_a_fused_kernel_runs_each_kind_with_its_static_mask():
    """Without the attention soft-cap (Gemma 3), `xla` (and splash, cuDNN: a static mask
    each) runs a mixed stack, the layer's flag picking the local or the causal call; on a
    packed row it gives the matmul kernel's logits."""
    cfg = dataclasses.replace(GEMMA, scan_layers=True, attn_softcap=0.0)
    fused = build(dataclasses.replace(cfg, attention="xla"))
    assert fused.layers.attn.impl == "xla"
    toks, segments = row(), jnp.asarray([[1] * 7 + [2] * 5])
    np.testing.assert_allclose(
        fused(toks, segment_ids=segments),
        build(cfg)(toks, segment_ids=segments),
        atol=TOL,
        rtol=0,
    )


@needs_libtpu
def test_for_a_tpu_the_mixed_stack_lowers_to_the_splash_kernel():
    """Lowered (not compiled: ~1 s) for a TPU v6e device from this host, the scanned mixed
    stack's forward and backward hold the Pallas kernel (a tpu_custom_call), one call of
    each kind behind the layer's flag (stablehlo.case), and no matmul fallback."""
    cfg = dataclasses.replace(
        GEMMA, scan_layers=True, attn_softcap=0.0, attention="splash", dtype="bfloat16"
    )
    mesh = build_mesh(MeshConfig(), target_devices(parse_target("tpu:v6e-1")))
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))

    def loss(state: nnx.State, toks: jax.Array) -> jax.Array:
        return jnp.mean(nnx.merge(graphdef, state)(toks).astype(jnp.float32))

    with use_rules(mesh, DEFAULT_RULES):
        toks = jax.ShapeDtypeStruct((2, 16), jnp.int32)
        text = jax.jit(jax.grad(loss)).lower(state, toks).as_text()
    assert "tpu_custom_call" in text and "stablehlo.case" in text


def test_a_packed_row_equals_its_documents_alone():
    model = build(dataclasses.replace(GEMMA, scan_layers=True))
    toks = row()
    segments = jnp.asarray([[1] * 7 + [2] * 5])
    packed = model(toks, segment_ids=segments)
    for lo, hi in ((0, 7), (7, 12)):
        np.testing.assert_allclose(packed[:, lo:hi], model(toks[:, lo:hi]), atol=TOL, rtol=0)


def test_the_kv_cache_gives_the_plain_forward():
    """Two rows, prefilled with 5 tokens and with 2 (then padding, position -1), then 7
    tokens one at a time: past the window of 3 on the sliding layers, whose cache is a
    ring of 3 slots that the 5-token prefill already wraps."""
    model = build(dataclasses.replace(GEMMA, scan_layers=True))
    toks = row()
    cache = KVCache.empty(model.cfg, batch=2, length=12, dtype=jnp.float32)
    pos = jnp.asarray([[0, 1, 2, 3, 4], [0, 1, -1, -1, -1]])
    logits, cache = model(jnp.concatenate([toks[:, :5]] * 2), pos, cache=cache)
    steps = [logits[:, :2]]
    for t in range(7):
        now = jnp.asarray([[5 + t], [2 + t]])
        logits, cache = model(toks[0, now], now, cache=cache)
        steps.append(logits)
    got = jnp.concatenate(steps, axis=1)
    plain = model(toks)  # row 1 is row 0's tokens 0, 1, then 2..8: the same row
    np.testing.assert_allclose(got[0, 2:], plain[0, 5:12], atol=TOL, rtol=0)
    np.testing.assert_allclose(got[1], plain[0, :9], atol=TOL, rtol=0)


def test_the_cache_of_a_sliding_layer_holds_only_its_window():
    """Gemma's stack (sliding, global, sliding; window 3): one global layer of 12 slots and
    two sliding ones of 3, not three of 12; Mistral's (every layer sliding): no global."""
    b, kv, d = 2, GEMMA.num_kv_heads, GEMMA.head_dim
    cache = KVCache.empty(GEMMA, batch=b, length=12, dtype=jnp.float32)
    assert cache.k.shape == cache.v.shape == (1, b, 12, kv, d)
    assert cache.local_k.shape == cache.local_v.shape == (2, b, 3, kv, d)
    nbytes = sum(a.nbytes for a in jax.tree.leaves(cache))
    assert KVCache.nbytes(GEMMA, b, 12, jnp.float32) == nbytes == 2 * 4 * b * kv * d * (12 + 3 * 2)
    mistral = dataclasses.replace(GEMMA, global_every=0)
    cache = KVCache.empty(mistral, batch=b, length=12, dtype=jnp.float32)
    assert cache.k.shape[0] == 0 and cache.local_k.shape == (3, b, 3, kv, d)
    short = KVCache.empty(mistral, batch=b, length=2, dtype=jnp.float32)  # shorter than a window
    assert short.local_k.shape == (3, b, 2, kv, d)
