"""Generation: the KV-cached forward equals the plain one, `generate` continues each row of
a right-padded batch from its own length, sampling is reproducible, top-k/top-p and eos
behave, it compiles once per shape, the training forward never sees the cache, and a
request (a block, a seed, a top-k, a cache) too large for its types or the memory is cut
to size or refused in one line."""

import dataclasses
import functools
import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY, assert_equal_to_rounding
from flax import nnx

from nnxtrain import UserError, generate
from nnxtrain.config import ModelConfig
from nnxtrain.model import Transformer
from nnxtrain.model.cache import KVCache
from nnxtrain.model.generation import MAX_SEED, Sampling, choose, stream

# init_std 0.5 makes the logits depend strongly on the context (with the default 0.02 a
# random model's next token barely depends on its prompt, and any generation test passes).
CFG = dataclasses.replace(TINY, init_std=0.5)

# Cached and full forward compute the same sums in other orders and shapes: attention over
# 16 cache slots (12 positions) instead of 12, grouped-head einsums instead of repeated-head
# matmuls. As in test_model, a logit of CFG sums at most 16 positions, each through
# contractions no longer than 32 terms (the vocabulary; emb 16, mlp 24, head_dim 8), so at
# most 16·32 terms: conftest.rounding_tolerance gives 6.1e-5 of the largest logit.
TERMS = 16 * 32


@functools.cache
def build(cfg: ModelConfig = CFG) -> Transformer:
    """A model with weights drawn by numpy, N(0, init_std), norm scales 1: the model's own
    initialisers compile one program per weight shape, slower on a CPU than every test
    here together."""
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)

    def draw(path: tuple, leaf: jax.ShapeDtypeStruct) -> jax.Array:
        if "scale" in jax.tree_util.keystr(path):
            return jnp.ones(leaf.shape, leaf.dtype)
        return jnp.asarray(rng.normal(0.0, cfg.init_std, leaf.shape), leaf.dtype)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(draw, abstract))


@nnx.jit
def forward(model: Transformer, toks: jax.Array, pos: jax.Array | None = None, cache=None):
    """The model's call, jitted (run eagerly, every op of it compiles on its own)."""
    return model(toks, pos) if cache is None else model(toks, pos, cache=cache)


def random_tokens(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.asarray(jax.random.randint(jax.random.key(seed), shape, 0, CFG.vocab_size), np.int32)


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_incremental_decode_logits_equal_the_full_forward(scan):
    model = build(dataclasses.replace(CFG, scan_layers=scan))
    toks = jnp.asarray(random_tokens((2, 12)))
    full = forward(model, toks)
    cache = KVCache.empty(model.cfg, 2, 16, jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(12), (2, 12))
    logits, cache = forward(model, toks[:, :5], pos[:, :5], cache)  # prefill 5, then 1 by 1
    steps = [logits]
    for t in range(5, 12):
        logits, cache = forward(model, toks[:, t : t + 1], pos[:, t : t + 1], cache)
        steps.append(logits)
    incremental = jnp.concatenate(steps, axis=1)
    assert float(jnp.max(jnp.abs(full))) > 1.0  # logits of a scale worth comparing
    assert_equal_to_rounding(incremental, full, TERMS, "cached vs full logits")
    # the cache holds each position's keys at its slot, nothing past the last one
    assert float(jnp.max(jnp.abs(cache.k[:, :, :12]))) > 0
    assert float(jnp.max(jnp.abs(cache.k[:, :, 12:]))) == 0


def test_greedy_batch_equals_each_row_alone():
    model = build()
    lengths = np.array([5, 2, 4])
    prompts = random_tokens((3, 5))  # right padding: random tokens past each length
    out = np.asarray(generate(model, prompts, max_new_tokens=10, prompt_lengths=lengths))
    assert out.shape == (3, 10) and out.dtype == np.int32
    for row, n in enumerate(lengths):
        alone = generate(model, prompts[row : row + 1, :n], max_new_tokens=10)
        np.testing.assert_array_equal(out[row], np.asarray(alone)[0], err_msg=f"row {row}")
    assert len({tuple(r) for r in out}) == 3  # the rows really continue different prompts


def test_greedy_takes_the_argmax_of_the_full_forward():
    model = build()
    prompt = random_tokens((1, 5), seed=2)
    out = np.asarray(generate(model, prompt, max_new_tokens=10))
    seq = jnp.asarray(np.concatenate([prompt, out], axis=1))
    # causal: the full forward's logits at the positions of the prompt's last token and
    # every generated one but the last choose exactly the tokens that follow them
    logits = forward(model, seq[:, :-1])
    np.testing.assert_array_equal(np.asarray(jnp.argmax(logits[0, 4:], axis=-1)), out[0])


def sample(model: Transformer, **kw) -> np.ndarray:
    prompts, lengths = random_tokens((2, 5)), np.array([5, 2])
    kw.setdefault("max_new_tokens", 16)
    return np.asarray(generate(model, prompts, prompt_lengths=lengths, **kw))


def test_sampling_is_reproducible_for_a_seed_and_differs_for_another():
    model = build()
    a = sample(model, temperature=1.0, seed=3)
    np.testing.assert_array_equal(a, sample(model, temperature=1.0, seed=3))
    assert not np.array_equal(a, sample(model, temperature=1.0, seed=4))
    assert not np.array_equal(a, sample(model))  # not greedy


def test_top_k_1_and_a_tiny_top_p_equal_greedy():
    model = build()
    greedy = sample(model)
    np.testing.assert_array_equal(sample(model, temperature=1.5, top_k=1, seed=1), greedy)
    np.testing.assert_array_equal(sample(model, temperature=1.5, top_p=1e-6, seed=2), greedy)


def test_top_k_and_top_p_keep_only_the_likeliest_tokens():
    # probabilities 0.4, 0.3, 0.2, 0.1 over tokens 3, 0, 2, 1
    logits = jnp.log(jnp.array([[0.3, 0.1, 0.2, 0.4]]))
    keys = jax.random.split(jax.random.key(0), 400)

    def drawn(top_k: int, top_p: float) -> set[int]:
        s = Sampling(jnp.float32(1.0), jnp.int32(top_k), jnp.float32(top_p), jnp.int32(-1))
        return set(
            np.asarray(jax.vmap(lambda k: choose(logits, s, k, False))(keys)).ravel().tolist()
        )

    assert drawn(0, 1.0) == {0, 1, 2, 3}
    assert drawn(2, 1.0) == {3, 0}
    assert drawn(0, 0.5) == {3, 0}  # 0.4 < 0.5: the second token is needed to reach 0.5
    assert drawn(0, 0.4) == {3}
    assert drawn(0, 0.75) == {3, 0, 2}  # 0.4 + 0.3 < 0.75
    assert drawn(3, 0.75) == {3, 0}  # within the top 3 the first two hold 0.7 / 0.9 > 0.75


def test_rows_stop_at_eos_and_are_filled_with_it():
    model = build()
    free = sample(model)
    eos = int(free[0, 3])  # a token row 0 emits at step 3
    out = sample(model, eos_id=eos)
    for row in range(2):
        hits = np.flatnonzero(free[row] == eos)
        stop = hits[0] if len(hits) else len(free[row])
        np.testing.assert_array_equal(out[row, : stop + 1], free[row, : stop + 1])
        assert (out[row, stop:] == eos).all()
    assert (out[0, 4:] == eos).all()
    # every row stops at its first token: the loop never runs, the shape stays
    first = int(free[0, 0])
    alone = np.asarray(
        generate(build(), random_tokens((2, 5))[:1], max_new_tokens=16, eos_id=first)
    )
    np.testing.assert_array_equal(alone, np.full((1, 16), first))


def test_it_compiles_once_per_shape_never_per_token(caplog):
    model = build()
    caplog.set_level(logging.WARNING)
    with jax.log_compiles(True):
        sample(model, temperature=1.0)  # compiles, unless an earlier test did
        caplog.clear()
        sample(model, temperature=1.0)
        sample(model, temperature=0.7, top_k=3, top_p=0.9, seed=5, eos_id=1)
        same_shape = traces(caplog.records)
        caplog.clear()
        sample(model, temperature=1.0, max_new_tokens=20)  # a new shape
        new_shape = traces(caplog.records)
    assert same_shape == {}
    assert new_shape == {"_prefill": 1, "_decode": 1}


def traces(records: list[logging.LogRecord]) -> dict[str, int]:
    """How often generation's jitted functions were traced, from jax's compile log."""
    counts: dict[str, int] = {}
    for r in records:
        msg = r.getMessage()
        for name in ("_prefill", "_decode"):
            if msg.startswith(f"Finished tracing {name} for jit"):
                counts[name] = counts.get(name, 0) + 1
    return counts


def test_the_training_forward_has_no_cache_operations():
    # The cache path writes with a scatter (`scatter`; the embedding's gradient is a
    # `scatter-add`, another primitive). The plain forward and its gradient, which the
    # train step takes, must have none: the cache stays out of training. (The train
    # step's jaxpr and StableHLO were also compared before and after the cache path was
    # added: identical for scanned/unrolled x remat none/full.)
    model = build()
    graphdef, params = nnx.split(model)
    toks = jnp.asarray(random_tokens((2, 8)))

    def loss(p: nnx.State) -> jax.Array:
        return jnp.mean(nnx.merge(graphdef, p)(toks))

    def cached(p: nnx.State) -> jax.Array:
        cache = KVCache.empty(CFG, 2, 8, jnp.float32)
        return jnp.mean(nnx.merge(graphdef, p)(toks, cache=cache)[0])

    def cache_writes(fn) -> int:
        text = str(jax.make_jaxpr(fn)(params))
        return len(re.findall(r"(?<![\w-])(scatter|dynamic_update_slice)\[", text))

    assert cache_writes(cached) == 2 * CFG.num_layers  # keys and values of every layer
    assert cache_writes(loss) == 0
    assert cache_writes(jax.grad(loss)) == 0


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"max_new_tokens": -1}, "max_new_tokens must be >= 0"),
        ({"max_new_tokens": 4, "temperature": -1.0}, "temperature must be >= 0"),
        ({"max_new_tokens": 4, "top_p": 0.0}, "top_p must be in"),
        ({"max_new_tokens": 4, "prompt_lengths": np.array([0, 2])}, "prompt_lengths must be"),
        ({"max_new_tokens": 30}, "exceeds the model's max_len of 32"),
        # JAX keeps a seed's low 32 bits (2**32 would repeat seed 0), or overflows past int64
        ({"max_new_tokens": 4, "seed": 2**70}, f"seed must be in 0..{MAX_SEED}, got {2**70}"),
        ({"max_new_tokens": 4, "seed": -1}, f"seed must be in 0..{MAX_SEED}, got -1"),
    ],
)
def test_bad_arguments_are_one_line_errors(kw, match):
    with pytest.raises(UserError, match=match) as e:
        generate(build(), random_tokens((2, 5)), **kw)
    assert "\n" not in str(e.value)


def test_zero_new_tokens_is_an_empty_result():
    assert generate(build(), random_tokens((2, 5)), max_new_tokens=0).shape == (2, 0)


def test_a_block_past_the_tokens_left_is_cut_to_them():
    # A block of 10**9 once sized the decode loop and the cache to 10**9 positions (256 GB).
    blocks = list(stream(build(), random_tokens((2, 5)), max_new_tokens=16, block=10**9))
    assert [b.shape[1] for b in blocks] == [1, 15]
    whole = generate(build(), random_tokens((2, 5)), max_new_tokens=16)
    np.testing.assert_array_equal(np.concatenate(blocks, axis=1), whole)


def test_a_top_k_past_the_vocabulary_keeps_every_token():
    model = build()
    everything = sample(model, temperature=1.0, seed=3)  # top_k=0: no limit
    np.testing.assert_array_equal(sample(model, temperature=1.0, seed=3, top_k=2**70), everything)


def test_a_kv_cache_larger_than_the_free_memory_is_refused_before_allocating():
    # A model whose max_len lets any request through (config.json's max_position_embeddings
    # 1e12, say): the cache is sized to the prompt plus the new tokens, and 10**14 positions
    # (25 PB) fit in no device's memory.
    model = build(dataclasses.replace(CFG, max_len=10**15))
    with pytest.raises(UserError, match=r"2 x 100000000000005 positions .* KV cache") as e:
        generate(model, random_tokens((2, 5)), max_new_tokens=10**14)
    assert "\n" not in str(e.value) and "free on" in str(e.value)
