"""The NNX Transformer: shapes, dtypes, GQA, scan/unroll, remat, tied embeddings, causality
and the logical axis names on every parameter."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY, assert_equal_to_rounding, rounding_tolerance
from flax import nnx

from nnxtrain import compose
from nnxtrain.config import ModelConfig
from nnxtrain.model import Transformer, resolve_auto
from nnxtrain.parallel.sharding import DEFAULT_RULES
from nnxtrain.train.loss import loss_sums

B, L = 2, 6

# Two programs computing the same sums in other orders (kernels, remat, scan, head layouts)
# agree to float32 rounding: a logit or gradient entry of TINY sums at most 32 tokens, each
# through contractions no longer than the vocabulary (32), so at most 32·32 terms
# (conftest.rounding_tolerance: 1.2e-4 of the leaf's largest entry).
TERMS = 32 * TINY.vocab_size


def tokens(seed: int = 0, vocab: int = TINY.vocab_size) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), (B, L), 0, vocab, dtype=jnp.int32)


def build(cfg: ModelConfig, seed: int = 0) -> Transformer:
    return Transformer(cfg, rngs=nnx.Rngs(seed))


def graphdef_of(cfg: ModelConfig) -> nnx.GraphDef:
    """The graph of a model with this config, without allocating its parameters."""
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: build(cfg)))
    return graphdef


def mean_loss(graphdef: nnx.GraphDef, params: nnx.State, toks: jax.Array) -> jax.Array:
    logits = nnx.merge(graphdef, params)(toks[:, :-1])
    sums = loss_sums(logits, toks[:, 1:], jnp.ones(toks[:, 1:].shape), z_loss=0.0)
    return sums["ce"] / sums["weight"]


# One compiled program per model config (the graphdef is static) instead of many eager ops.
loss_and_grads = jax.jit(jax.value_and_grad(mean_loss, argnums=1), static_argnums=0)
grads_of = jax.jit(jax.grad(mean_loss, argnums=1), static_argnums=0)


def params_of(model: nnx.Module) -> dict[tuple, nnx.Variable]:
    return dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))


# -- shapes and dtypes ----------------------------------------------------------------


def test_logits_shape_and_float32_dtype():
    logits = build(TINY)(tokens())
    assert logits.shape == (B, L, TINY.vocab_size)
    assert logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))


def test_auto_dtype_is_float32_on_cpu():
    model = build(dataclasses.replace(TINY, dtype="auto"))
    expected = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    assert model(tokens()).dtype == expected


def abstract_params_and_logits(cfg: ModelConfig) -> tuple[dict, jax.ShapeDtypeStruct]:
    """Parameter and logits shapes/dtypes by abstract evaluation (traced, not compiled)."""
    model = nnx.eval_shape(lambda: build(cfg))
    logits = nnx.eval_shape(lambda m, t: m(t), model, tokens())
    return params_of(model), logits


def test_bfloat16_activations_keep_float32_params():
    params, logits = abstract_params_and_logits(dataclasses.replace(TINY, dtype="bfloat16"))
    assert logits.dtype == jnp.bfloat16
    assert logits.shape == (B, L, TINY.vocab_size)
    assert {v.get_value().dtype for v in params.values()} == {jnp.dtype(jnp.float32)}


def test_bfloat16_params():
    cfg = dataclasses.replace(TINY, param_dtype="bfloat16", dtype="float32")
    params, logits = abstract_params_and_logits(cfg)
    assert {v.get_value().dtype for v in params.values()} == {jnp.dtype(jnp.bfloat16)}
    assert logits.dtype == jnp.float32


def test_parameter_shapes():
    c = TINY
    shapes = {k: v.get_value().shape for k, v in params_of(build(c)).items()}
    n, e, h, kv, d, m = c.num_layers, c.emb_dim, c.num_heads, c.num_kv_heads, c.head_dim, c.mlp_dim
    assert shapes == {
        ("embed",): (c.vocab_size, e),
        ("lm_head",): (e, c.vocab_size),
        ("final_norm", "scale"): (e,),
        ("layers", "attn_norm", "scale"): (n, e),
        ("layers", "mlp_norm", "scale"): (n, e),
        ("layers", "attn", "wq"): (n, e, h, d),
        ("layers", "attn", "wk"): (n, e, kv, d),
        ("layers", "attn", "wv"): (n, e, kv, d),
        ("layers", "attn", "wo"): (n, h, d, e),
        ("layers", "mlp", "w_gate"): (n, e, m),
        ("layers", "mlp", "w_up"): (n, e, m),
        ("layers", "mlp", "w_down"): (n, m, e),
    }


# -- grouped-query attention ----------------------------------------------------------


@pytest.mark.parametrize("kv_heads", [2, 1], ids=["gqa", "mqa"])
def test_grouped_kv_heads_equal_multi_head_attention_with_repeated_kv_heads(kv_heads):
    """4 query heads sharing kv heads == 4 kv heads where each shared head is copied."""
    cfg = dataclasses.replace(TINY, num_kv_heads=kv_heads)
    assert cfg.num_kv_heads < cfg.num_heads
    gqa = build(cfg)
    mha = build(dataclasses.replace(cfg, num_kv_heads=cfg.num_heads), seed=1)
    group = cfg.num_heads // cfg.num_kv_heads
    src = params_of(gqa)
    for path, var in params_of(mha).items():
        value = src[path].get_value()
        if path[-1] in ("wk", "wv"):  # [layers, embed, kv_heads, head_dim]
            value = jnp.repeat(value, group, axis=2)
        var.set_value(value)
    toks = tokens()
    assert_equal_to_rounding(gqa(toks), mha(toks), TERMS, "logits")


@pytest.fixture(scope="module")
def reference() -> tuple[nnx.State, jax.Array, jax.Array, nnx.State]:
    """The GQA model's params, a batch, and its loss and gradients without remat."""
    graphdef, params = nnx.split(build(TINY))
    toks = tokens(3)
    loss, grads = loss_and_grads(graphdef, params, toks)
    return params, toks, loss, grads


def test_gqa_loss_and_gradients_are_finite_and_reach_every_parameter(reference):
    _, _, loss, grads = reference
    assert 0 < float(loss) < 2 * np.log(TINY.vocab_size)
    for g in jax.tree.leaves(grads):
        assert bool(jnp.all(jnp.isfinite(g)))
        assert float(jnp.abs(g).max()) > 0


# -- scan vs unrolled, remat ----------------------------------------------------------


def test_scan_and_unrolled_layers_give_the_same_logits():
    scanned = build(dataclasses.replace(TINY, scan_layers=True), seed=0)
    unrolled = build(dataclasses.replace(TINY, scan_layers=False), seed=1)
    nnx.update(unrolled, nnx.state(scanned))  # the same parameters in both
    toks = tokens()
    assert_equal_to_rounding(scanned(toks), unrolled(toks), TERMS, "logits")


@pytest.mark.parametrize("remat", ["full", "dots", "dots_no_batch"])
def test_remat_policies_give_the_same_loss_and_grads(remat, reference):
    params, toks, ref_loss, ref_grads = reference
    rematted = graphdef_of(dataclasses.replace(TINY, remat=remat))
    loss, grads = loss_and_grads(rematted, params, toks)
    np.testing.assert_allclose(loss, ref_loss, rtol=rounding_tolerance(TERMS))
    assert_equal_to_rounding(grads, ref_grads, TERMS, "gradients")
    # The policy is really applied: the backward pass contains a checkpoint.
    jaxpr = str(jax.make_jaxpr(jax.grad(mean_loss, argnums=1))(rematted, params, toks))
    assert "checkpoint" in jaxpr or "remat" in jaxpr


def test_remat_none_has_no_checkpoint():
    base = dataclasses.replace(TINY, remat="none")
    graphdef, params = nnx.split(build(base))
    jaxpr = str(jax.make_jaxpr(jax.grad(mean_loss, argnums=1))(graphdef, params, tokens()))
    assert "checkpoint" not in jaxpr and "remat" not in jaxpr


# -- tied embeddings ------------------------------------------------------------------


def test_tie_embeddings_removes_lm_head_and_uses_the_embedding_for_output():
    cfg = dataclasses.replace(TINY, tie_embeddings=True)
    tied = build(cfg)
    assert not hasattr(tied, "lm_head")
    assert all("lm_head" not in path for path in params_of(tied))
    # A token that never appears in the input still gets an embedding gradient through the
    # output projection when (and only when) the embedding is tied.
    toks = tokens(vocab=cfg.vocab_size - 1)
    unused = cfg.vocab_size - 1
    graphdef, params = nnx.split(tied)
    tied_row = grads_of(graphdef, params, toks)["embed"].get_value()[unused]
    assert bool(jnp.any(tied_row != 0))
    graphdef, params = nnx.split(build(TINY))
    untied_row = grads_of(graphdef, params, toks)["embed"].get_value()[unused]
    assert not bool(jnp.any(untied_row != 0))


# -- causality ------------------------------------------------------------------------


def test_changing_a_later_token_does_not_change_earlier_logits():
    model = build(TINY)
    toks = tokens(5)
    t = 3
    changed = toks.at[:, t].set((toks[:, t] + 1) % TINY.vocab_size)
    a, b = model(toks), model(changed)
    np.testing.assert_allclose(a[:, :t], b[:, :t], rtol=0, atol=1e-6)
    assert float(jnp.abs(a[:, t] - b[:, t]).max()) > 1e-4


# -- logical axis names ---------------------------------------------------------------


def test_every_parameter_has_logical_axis_names_of_its_rank():
    params = params_of(build(TINY))
    assert params, "the model has no parameters"
    for path, var in params.items():
        names = var.get_metadata().get("out_sharding")
        where = "/".join(map(str, path))
        assert names is not None, f"{where} has no out_sharding metadata"
        assert len(names) == var.get_value().ndim, f"{where}: {names} vs {var.get_value().shape}"
        for name in names:
            assert name in DEFAULT_RULES, f"{where}: logical name {name!r} has no sharding rule"
        if path[0] == "layers":
            assert names[0] == "layers", f"{where}: stacked weight must lead with 'layers'"
            assert var.get_value().shape[0] == TINY.num_layers
            assert "layers" not in names[1:]
        else:
            assert "layers" not in names, f"{where}: only stacked weights have 'layers'"


def test_expected_logical_names():
    names = {k: v.get_metadata()["out_sharding"] for k, v in params_of(build(TINY)).items()}
    assert names[("embed",)] == ("vocab", "embed")
    assert names[("lm_head",)] == ("embed", "vocab")
    assert names[("final_norm", "scale")] == ("norm",)
    assert names[("layers", "mlp", "w_gate")] == ("layers", "embed", "mlp")
    assert names[("layers", "mlp", "w_down")] == ("layers", "mlp", "embed")
    assert names[("layers", "attn", "wq")][:2] == ("layers", "embed")
    assert names[("layers", "attn", "wk")][2] == "kv_heads"


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_attention_kernels_agree(kv_heads):
    """The CPU `matmul` kernel and JAX's `xla` kernel compute the same logits and grads."""
    cfgs = [
        dataclasses.replace(TINY, num_kv_heads=kv_heads, attention=a) for a in ("xla", "matmul")
    ]
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, TINY.vocab_size, (2, 16)))
    outs = []
    for cfg in cfgs:
        graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))

        def loss(p, graphdef=graphdef):
            logits = nnx.merge(graphdef, p)(tokens)
            return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])

        outs.append(jax.jit(jax.value_and_grad(loss))(params))  # one program, not op by op
    (l_xla, g_xla), (l_mm, g_mm) = outs
    np.testing.assert_allclose(l_mm, l_xla, rtol=rounding_tolerance(TERMS))
    assert_equal_to_rounding(g_mm, g_xla, TERMS, "gradients")


# -- auto choices per platform ----------------------------------------------------------


@pytest.mark.parametrize(
    "platform,attention,dtype",
    [
        ("tpu", "splash", "bfloat16"),
        ("gpu", "cudnn", "bfloat16"),
        ("cuda", "cudnn", "bfloat16"),
        ("rocm", "xla", "bfloat16"),
        ("cpu", "matmul", "float32"),
    ],
)
def test_resolve_auto_picks_the_platforms_kernel_and_dtype(platform, attention, dtype):
    auto = dataclasses.replace(TINY, attention="auto", dtype="auto")
    resolved = resolve_auto(auto, platform)
    assert (resolved.attention, resolved.dtype) == (attention, dtype)
    # scan_layers=null: one scanned layer body on accelerators, unrolled layers on CPU
    scan = platform != "cpu"
    assert auto.scan_layers is None and resolved.scan_layers is scan
    assert resolved == dataclasses.replace(auto, attention=attention, dtype=dtype, scan_layers=scan)


def test_resolve_auto_keeps_concrete_choices():
    cfg = dataclasses.replace(TINY, attention="xla", dtype="float16", scan_layers=False)
    assert resolve_auto(cfg, "tpu") == cfg
    # float32 by hand on a GPU: cuDNN's flash attention takes half precision only
    f32 = resolve_auto(dataclasses.replace(TINY, attention="auto", dtype="float32"), "gpu")
    assert (f32.attention, f32.dtype) == ("xla", "float32")
    with pytest.raises(ValueError, match="'metal'"):
        resolve_auto(cfg, "metal")


def test_attention_honours_a_concrete_kernel_and_keeps_auto_as_before():
    impls = {
        a: build(dataclasses.replace(TINY, attention=a)).layers.attn.impl
        for a in ("auto", "matmul", "xla", "splash")
    }
    auto = "matmul" if jax.default_backend() == "cpu" else "auto"
    assert impls == {"auto": auto, "matmul": "matmul", "xla": "xla", "splash": "splash"}
    assert compose(["model.attention=splash"]).model.attention == "splash"
