"""Packed documents in the model: with segment ids, attention is causal within each document
only, and positions restart, so a packed document's logits are those it has alone; without
them the forward is the plain causal one."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY
from flax import nnx

from nnxtrain.model import Transformer
from nnxtrain.model import attention as attention_module
from nnxtrain.model.cache import KVCache
from nnxtrain.model.transformer import document_positions

# One row of 16: document 1 (5 tokens), document 2 (7 tokens), then 4 padding tokens.
LENGTHS, ROW = (5, 7), 16
KERNELS = ("matmul", "xla", "splash")

# The bound for "equal to running it alone". Packed and alone differ only in the
# order of float32 sums (masked keys add exact zeros; the matmul shapes differ), so they
# agree to rounding: measured differences are ~3e-8 for TINY's logits (|logit| < 0.2).
ALONE_TOL = 1e-5


def build(attention: str = "matmul", seed: int = 0, **overrides: object) -> Transformer:
    cfg = dataclasses.replace(TINY, attention=attention, **overrides)  # type: ignore[arg-type]
    return Transformer(cfg, rngs=nnx.Rngs(seed))


def documents(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, TINY.vocab_size, n).astype(np.int32) for n in LENGTHS]


def packed(docs: list[np.ndarray]) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(tokens, positions, segment ids) [1, ROW] of the documents packed in one row."""
    tokens, positions, segments = (np.zeros(ROW, np.int32) for _ in range(3))
    start = 0
    for i, doc in enumerate(docs, 1):
        end = start + len(doc)
        tokens[start:end], positions[start:end], segments[start:end] = doc, range(len(doc)), i
        start = end
    return jnp.asarray(tokens[None]), jnp.asarray(positions[None]), jnp.asarray(segments[None])


def span(i: int) -> slice:
    start = sum(LENGTHS[:i])
    return slice(start, start + LENGTHS[i])


# Every kernel scanned; unrolled with matmul only (the layers pass segment ids on the same
# way for every kernel: the scan is what differs).
@pytest.mark.parametrize(("kernel", "scan"), [(k, True) for k in KERNELS] + [("matmul", False)])
def test_a_packed_document_has_the_logits_it_has_alone(kernel: str, scan: bool):
    model = build(kernel, scan_layers=scan)
    docs = documents()
    toks, pos, seg = packed(docs)
    logits = model(toks, pos, seg)[0]
    for i, doc in enumerate(docs):
        alone = model(jnp.asarray(doc[None]))[0]
        np.testing.assert_allclose(logits[span(i)], alone, atol=ALONE_TOL, rtol=0)


@pytest.mark.parametrize("kernel", KERNELS)
def test_changing_document_1_leaves_document_2_exactly_unchanged(kernel: str):
    model = build(kernel)
    docs = documents()
    toks, pos, seg = packed(docs)
    other = [np.roll(docs[0], 1) + 1, docs[1]]  # every token of document 1 differs
    other_toks, _, _ = packed(other)
    assert not np.array_equal(toks[0, span(0)], other_toks[0, span(0)])
    before, after = model(toks, pos, seg)[0], model(other_toks, pos, seg)[0]
    # Bitwise: a masked score's exp is exactly 0, so document 1 contributes exact zeros.
    np.testing.assert_array_equal(after[span(1)], before[span(1)])
    assert not np.allclose(after[span(0)], before[span(0)])  # document 1 itself did change


def test_without_segment_ids_document_2_sees_document_1():
    """The test above can fail: the plain causal forward lets document 1 leak into 2."""
    model = build()
    docs = documents()
    toks, pos, _ = packed(docs)
    other_toks, _, _ = packed([np.roll(docs[0], 1) + 1, docs[1]])
    before, after = model(toks, pos)[0], model(other_toks, pos)[0]
    assert not np.allclose(after[span(1)], before[span(1)])


@pytest.mark.parametrize("kernel", KERNELS)
def test_gradients_do_not_cross_documents(kernel: str):
    """The loss of document 2 has no gradient with respect to document 1's embeddings."""
    model = build(kernel)
    toks, pos, seg = packed(documents())

    def doc2_loss(scale: jax.Array) -> jax.Array:
        # Each position's input is scaled by a factor: d(loss)/d(factor) shows who matters.
        logits = _forward_with_input_scale(model, toks, pos, seg, scale)
        return jnp.sum(logits[0, span(1)] ** 2)

    grad = jax.grad(doc2_loss)(jnp.ones(ROW))
    assert np.all(np.asarray(grad[span(0)]) == 0)
    assert np.all(np.abs(np.asarray(grad[span(1)])) > 0)


def _forward_with_input_scale(
    model: Transformer, toks: jax.Array, pos: jax.Array, seg: jax.Array, scale: jax.Array
) -> jax.Array:
    """The model's forward with each position's embedding multiplied by `scale[position]`."""
    dt = jnp.float32
    x = jnp.take(model.embed[...].astype(dt), toks, axis=0) * scale[None, :, None]
    x = model._layers(x, pos, seg)
    head = model.embed[...].T if model.cfg.tie_embeddings else model.lm_head[...]
    return model.final_norm(x) @ head


def test_one_segment_is_the_plain_causal_forward():
    model = build()
    toks = jnp.asarray(np.arange(1, ROW + 1, dtype=np.int32)[None] % TINY.vocab_size)
    plain = model(toks)
    one_doc = model(toks, segment_ids=jnp.ones_like(toks))
    np.testing.assert_allclose(one_doc, plain, atol=ALONE_TOL, rtol=0)


def test_positions_restart_at_each_document_when_not_given():
    seg = jnp.asarray([[1, 1, 1, 2, 2, 3, 0, 0], [4, 4, 4, 4, 4, 4, 4, 4]])
    expected = [[0, 1, 2, 0, 1, 0, 0, 1], [0, 1, 2, 3, 4, 5, 6, 7]]
    np.testing.assert_array_equal(document_positions(seg), expected)
    model = build()
    docs = documents()
    toks, pos, seg = packed(docs)
    derived, given = model(toks, segment_ids=seg), model(toks, pos, seg)
    used = sum(LENGTHS)  # packed() gives padding position 0; derived ones count on
    np.testing.assert_array_equal(derived[:, :used], given[:, :used])


def test_cudnn_without_a_gpu_falls_back_to_xla_with_one_warning(capsys: pytest.CaptureFixture):
    if jax.default_backend() == "gpu":
        pytest.skip("cuDNN is present: the masked call runs on it")
    attention_module._warned_cudnn_fallback = False
    model, reference = build("cudnn"), build("xla")
    toks, pos, seg = packed(documents())
    out = model(toks, pos, seg)
    model(toks, pos, seg)
    np.testing.assert_array_equal(out, reference(toks, pos, seg))
    err = capsys.readouterr().err
    assert err.count("model.attention=cudnn cannot mask attention") == 1, err


def test_segment_ids_with_a_cache_are_refused():
    model = build()
    cache = KVCache.empty(model.cfg, batch=1, length=ROW, dtype=jnp.float32)
    toks, pos, seg = packed(documents())
    with pytest.raises(ValueError, match="segment_ids"):
        model(toks, pos, seg, cache=cache)  # type: ignore[call-overload]


@pytest.mark.parametrize("kernel", KERNELS)
def test_a_sliding_window_holds_in_every_kernel_and_within_documents(kernel: str):
    """Window 3 (shorter than both documents): each kernel's packed row equals the matmul
    kernel's documents alone (the one tests/interop checks against transformers), and the
    window does change the logits."""
    model, reference = build(kernel, sliding_window=3), build("matmul", sliding_window=3)
    docs = documents()
    logits = model(*packed(docs))[0]
    for i, doc in enumerate(docs):
        alone = reference(jnp.asarray(doc[None]))[0]
        np.testing.assert_allclose(logits[span(i)], alone, atol=ALONE_TOL, rtol=0)
    unwindowed = build("matmul")(jnp.asarray(docs[1][None]))[0]
    assert np.max(np.abs(np.asarray(unwindowed) - np.asarray(logits[span(1)]))) > 1e-3
