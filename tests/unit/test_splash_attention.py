"""model.attention=splash: the Pallas splash-attention kernel computes what the xla kernel
does (`jax.nn.dot_product_attention`), here on the CPU in Pallas's interpret mode.

Checked for the kernel alone and inside the tiny Transformer (logits and parameter
gradients): causal only and with segment ids (packed documents and padding), grouped and
multi-query heads, lengths that are not a multiple of the kernel's 128-token blocks (1, 7,
130), and on a mesh of 4 CPU devices (a subprocess), where the kernel runs under
shard_map. Each comparison is shown able to fail: the tolerance is far below what a
dropped mask, a wrong scale or a wrong head grouping changes.

With libtpu installed, the layer's forward and backward also compile ahead of time for a
TPU v6e topology (bench/splash_aot.py): a tpu_custom_call, and no [length, length]
scores among the temporaries.
"""

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY, assert_equal_to_rounding, rounding_tolerance
from flax import nnx

from nnxtrain.model import Transformer
from nnxtrain.model import attention as attention_module
from nnxtrain.model.attention import fused_attention, splash_attention

ROOT = Path(__file__).resolve().parents[2]
HEADS, HEAD_DIM = 4, 8


def tolerance_terms(length: int, contraction: int) -> int:
    """Terms per sum, for conftest's float32 rounding bound (n terms added in another
    order: n·eps of the sum of their magnitudes): an output or gradient entry sums at
    most `length` keys (or tokens), each through contractions of at most `contraction`
    terms. The kernel also adds its keys block by block with an online softmax (exp of
    running maxima), which rounds within the same bound: measured differences are about
    1e-6 of the largest entry, the bound for length 130 and head_dim 8 is 1.2e-4."""
    return length * contraction


def documents(batch: int, length: int) -> jax.Array:
    """Segment ids [batch, length]: row 0 holds two packed documents then padding (0);
    row 1 one document then padding; a row of length 1 is one token of document 1."""
    seg = np.zeros((batch, length), np.int32)
    third = max(length // 3, 1)
    seg[0, :third], seg[0, third : 2 * third + 1] = 1, 2
    seg[1:, : max(length // 2, 1)] = 3
    return jnp.asarray(seg)


# -- the kernel alone -------------------------------------------------------------------

# (length, kv_heads, with segment ids)
KERNEL_CASES = {
    "one-token-mha": (1, 4, False),
    "7-mqa": (7, 1, False),
    "7-gqa-documents": (7, 2, True),
    "130-gqa-documents": (130, 2, True),
}


def qkv(length: int, kv_heads: int, seed: int = 0) -> tuple[jax.Array, ...]:
    """Random q [2, length, 4, 8], k and v [2, length, kv_heads, 8], and an output
    cotangent like q."""
    keys = jax.random.split(jax.random.key(seed), 4)
    shapes = [(HEADS, HEAD_DIM), (kv_heads, HEAD_DIM), (kv_heads, HEAD_DIM), (HEADS, HEAD_DIM)]
    return tuple(jax.random.normal(k, (2, length, *s)) for k, s in zip(keys, shapes, strict=True))


@jax.jit
def xla(q: jax.Array, k: jax.Array, v: jax.Array, seg: jax.Array | None) -> jax.Array:
    return fused_attention(q, k, v, "xla", seg)


@jax.jit
def splash(q: jax.Array, k: jax.Array, v: jax.Array, seg: jax.Array | None) -> jax.Array:
    return splash_attention(q, k, v, seg)


def output_and_grads(kernel, q, k, v, cotangent, seg) -> tuple[jax.Array, tuple]:
    """The kernel's output and the gradients of <output, cotangent> w.r.t. q, k and v."""
    out, vjp = jax.vjp(lambda q, k, v: kernel(q, k, v, seg), q, k, v)
    return out, vjp(cotangent)


@pytest.fixture(scope="module", params=list(KERNEL_CASES))
def kernel_case(request: pytest.FixtureRequest) -> dict:
    """One case's inputs, and the xla and splash outputs and gradients (computed once)."""
    length, kv_heads, with_segments = KERNEL_CASES[request.param]
    q, k, v, cotangent = qkv(length, kv_heads)
    seg = documents(2, length) if with_segments else None
    case = {"q": q, "k": k, "v": v, "seg": seg, "cotangent": cotangent, "length": length}
    case["xla"] = output_and_grads(xla, q, k, v, cotangent, seg)
    case["splash"] = output_and_grads(splash, q, k, v, cotangent, seg)
    return case


def test_splash_equals_xla_outputs_and_gradients(kernel_case: dict):
    terms = tolerance_terms(kernel_case["length"], HEAD_DIM)
    (out, grads), (ref_out, ref_grads) = kernel_case["splash"], kernel_case["xla"]
    assert out.shape == ref_out.shape
    assert_equal_to_rounding(out, ref_out, terms, "output")
    # The gradients of q, k and v are sums of the same products (probabilities, cotangent
    # times values, their differences times keys or queries), so the largest entry of the
    # three stands for the terms' magnitude; an entry's own size does not where terms
    # cancel (for one token, dq and dk are exactly 0 in xla: its softmax is constant).
    tol = rounding_tolerance(terms)
    scale = max(float(np.max(np.abs(g))) for g in ref_grads)
    for name, grad, ref in zip("qkv", grads, ref_grads, strict=True):
        np.testing.assert_allclose(grad, ref, rtol=tol, atol=tol * scale, err_msg=f"d{name}")


def test_the_comparison_fails_on_a_wrong_mask_scale_or_head_grouping(kernel_case: dict):
    """What the comparison above would catch: each wrong variant of the reference differs
    from splash by more than the tolerance."""
    q, k, v, seg, length = (kernel_case[n] for n in ("q", "k", "v", "seg", "length"))
    out = kernel_case["splash"][0]
    terms = tolerance_terms(length, HEAD_DIM)
    group = HEADS // k.shape[2]
    wrong = {"keys and values swapped": xla(q, v, k, seg)}
    if length > 1:  # one token sees only itself, whatever the causality and the scale
        wrong["not causal"] = jax.nn.dot_product_attention(q, k, v, is_causal=False)
        wrong["unscaled"] = jax.nn.dot_product_attention(q, k, v, is_causal=True, scale=1.0)
    if seg is not None:
        wrong["segments dropped"] = xla(q, k, v, None)
    if 1 < group < HEADS:  # query head i shares kv head i // group, not i % kv_heads
        tiled = [jnp.tile(t, (1, 1, group, 1)) for t in (k, v)]
        wrong["heads grouped round-robin"] = xla(q, *tiled, seg)
    for name, reference in wrong.items():
        with pytest.raises(AssertionError):
            assert_equal_to_rounding(out, reference, terms, name)


def test_splash_off_tpu_warns_once_that_it_interprets(capsys: pytest.CaptureFixture):
    attention_module._warned_splash_interpret = False
    q, k, v, _ = qkv(7, 2)
    for _ in range(2):
        jax.eval_shape(splash_attention, q, k, v)
    err = capsys.readouterr().err
    assert err.count("model.attention=splash is a TPU kernel; on cpu it runs in Pallas") == 1


# -- inside the Transformer -------------------------------------------------------------

# The Transformer's contractions are at most 32 terms long (vocabulary 32, mlp 24, model
# width 16, head_dim 8).
CONTRACTION = 32


def loss_and_grads(cfg, tokens: jax.Array, seg: jax.Array | None) -> tuple:
    """Logits, and the gradients of a loss over them w.r.t. every parameter."""
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))

    def loss(params: nnx.State) -> tuple[jax.Array, jax.Array]:
        logits = nnx.merge(graphdef, params)(tokens, None, seg)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0]), logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return logits, grads


@pytest.mark.parametrize(
    "length,kv_heads,with_segments",
    [(130, 2, True), (7, 1, False)],
    ids=["130-gqa-documents", "7-mqa-causal"],
)
def test_transformer_with_splash_equals_xla(length: int, kv_heads: int, with_segments: bool):
    cfg = dataclasses.replace(TINY, num_kv_heads=kv_heads, max_len=256)
    tokens = jax.random.randint(jax.random.key(1), (2, length), 0, cfg.vocab_size)
    seg = documents(2, length) if with_segments else None
    splash_logits, splash_grads = loss_and_grads(
        dataclasses.replace(cfg, attention="splash"), tokens, seg
    )
    xla_logits, xla_grads = loss_and_grads(dataclasses.replace(cfg, attention="xla"), tokens, seg)
    terms = tolerance_terms(length, CONTRACTION)
    assert_equal_to_rounding(splash_logits, xla_logits, terms, "logits")
    assert_equal_to_rounding(splash_grads, xla_grads, terms, "parameter gradients")
    if with_segments:  # the comparison can fail: the documents leak into each other
        leaky_logits, _ = loss_and_grads(dataclasses.replace(cfg, attention="xla"), tokens, None)
        with pytest.raises(AssertionError):
            assert_equal_to_rounding(splash_logits, leaky_logits, terms, "logits")


# -- on a mesh of 4 CPU devices ---------------------------------------------------------

MESH_SCRIPT = textwrap.dedent(
    """
    import dataclasses, json, sys
    import jax
    jax.config.update("jax_num_cpu_devices", 4)
    import jax.numpy as jnp, numpy as np
    from flax import nnx
    from jax.sharding import Mesh
    from nnxtrain.config import LoraConfig, ModelConfig, MoeConfig
    from nnxtrain.model import Transformer
    from nnxtrain.parallel.sharding import DEFAULT_RULES, use_rules

    fields, seg = json.loads(sys.argv[1]), np.asarray(json.loads(sys.argv[2]))
    nested = {"lora": LoraConfig(**fields["lora"]), "moe": MoeConfig(**fields["moe"])}
    cfg = ModelConfig(**fields | nested)
    tokens = jnp.asarray(np.arange(seg.size).reshape(seg.shape) % cfg.vocab_size)
    mesh = Mesh(np.array(jax.devices()).reshape(1, 2, 2), ("data", "fsdp", "tensor"))
    # kv heads replicated, query heads split 2 ways: MQA's one kv head must be repeated
    rules = dict(DEFAULT_RULES, kv_heads=None, activation_kv_heads=None)
    results = {}
    for kernel in ("xla", "splash"):
        graphdef, params = nnx.split(Transformer(dataclasses.replace(cfg, attention=kernel),
                                                 rngs=nnx.Rngs(0)))
        def loss(params):
            logits = nnx.merge(graphdef, params)(tokens, None, jnp.asarray(seg))
            return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0]), logits
        with use_rules(mesh, rules):
            lowered = jax.jit(jax.value_and_grad(loss, has_aux=True)).lower(params)
        (_, logits), grads = lowered.compile()(params)
        results[kernel + "_manual"] = np.asarray("sdy.manual_computation" in lowered.as_text())
        results[kernel + "_logits"] = np.asarray(logits)
        for i, g in enumerate(jax.tree.leaves(grads)):
            results[f"{kernel}_grad{i}"] = np.asarray(g)
    np.savez(sys.argv[3], **results)
    """
)


# MQA only: its one kv head is repeated for the query heads split over `tensor`, the case a
# mesh adds (GQA's grouping is checked on one device above; 9 s saved)
def test_on_a_mesh_splash_runs_under_shard_map_and_equals_xla(tmp_path: Path):
    length = 7
    cfg = dataclasses.replace(TINY, num_kv_heads=1)
    fields = dataclasses.asdict(cfg)  # nested configs as dicts (the script rebuilds them)
    seg = np.asarray(documents(4, length)).tolist()
    out = tmp_path / "results.npz"
    proc = subprocess.run(
        [sys.executable, "-c", MESH_SCRIPT, json.dumps(fields), json.dumps(seg), str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = np.load(out)
    assert results["splash_manual"] and not results["xla_manual"]
    terms = tolerance_terms(length, CONTRACTION)
    assert_equal_to_rounding(results["splash_logits"], results["xla_logits"], terms, "logits")
    grads = sorted(n for n in results.files if n.startswith("xla_grad"))
    for name in grads:
        splash_name = name.replace("xla", "splash")
        assert_equal_to_rounding(results[splash_name], results[name], terms, name)


# -- compiled for TPU, ahead of time ----------------------------------------------------


AOT_ARGS = ["--seq", "8192", "--kernels", "splash", "--json"]


@pytest.mark.slow
def test_tpu_compile_holds_the_kernel_and_no_quadratic_temporaries():
    """bench/splash_aot.py on a v6e-8 topology (fsdp 4 × tensor 2, one example and two
    heads of 128 features per device), at length 8192 (bench/splash_aot.py's default
    2048 too: docs/performance.md)."""
    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu is not installed (pip install -e '.[tpu]'): no TPU compiler")
    # libtpu's start-up warnings on a host without TPUs are silenced by naming the
    # accelerator and the (one, local) worker; JAX_PLATFORMS keeps JAX off a TPU backend.
    env = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    env |= {"TPU_ACCELERATOR_TYPE": "v6e-8", "TPU_WORKER_HOSTNAMES": "localhost"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "splash_aot.py"), *AOT_ARGS],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["device"] == "TPU v6 lite"
    (result,) = report["results"]
    assert result["attention"] == "splash" and result["tpu_custom_call"]
    # One device's f32 scores at 8192: 2 heads × 8192² × 4 bytes. The xla kernel's
    # temporaries hold them (784 MiB, docs/performance.md: bench/splash_aot.py compiles both;
    # not compiled here: 10 s of test time); splash's hold not even a quarter of one.
    scores = 2 * 8192**2 * 4
    assert result["temp_bytes"] < scores / 4
