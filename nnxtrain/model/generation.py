"""Text generation with a KV cache: one prefill, then a jitted decode loop.

    new = generate(model, prompts, max_new_tokens=32)                      # greedy
    new = generate(model, prompts, max_new_tokens=32, temperature=0.8, top_p=0.95, seed=1)
    for block in stream(model, prompts, max_new_tokens=256, block=16):     # [batch, <=16]
        ...

`prompts` is int32 [batch, prompt_len], right-padded; `prompt_lengths` [batch] says how
many tokens of each row are real (None: all). Each row continues from its own length: its
new tokens take the positions `length, length + 1, ...` and are written into the cache at
those slots (see `nnxtrain.model.cache`), so a row gives the same tokens in any batch.

The prefill runs the padded prompts through the model once, filling the cache, and
chooses each row's first token from the logits at its last real position. The decode
loop (`lax.while_loop`) then feeds one token per row per iteration. Both are jitted with
the model's graph, the batch size, the prompt length, the number of tokens and whether
sampling is greedy as the only static facts: a new shape compiles once, and new prompts,
lengths, seeds, temperatures, top-k, top-p or eos ids do not compile again. Tokens are
never compiled per step. After a row emits `eos_id` its remaining tokens are `eos_id`;
the loop ends early when every row has.

The cache holds the widest prompt plus the new tokens, and no more (a sliding-window
layer only its window, see `nnxtrain.model.cache`): a `block` larger than
the tokens left is cut to them. A cache that would not fit in the memory free on the
device (twice over: the prefill holds a second copy while it fills it) is refused before
anything is allocated or compiled, with one line (`UserError`).

Sampling (temperature > 0) divides the logits by the temperature, keeps the `top_k`
largest (0: all), then the smallest set of those whose probability reaches `top_p`
(1.0: all), and draws from what is left. Temperature 0 takes the argmax.
"""

import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nnxtrain.errors import UserError
from nnxtrain.model.cache import KVCache, free_bytes
from nnxtrain.model.layers import activation_dtype
from nnxtrain.model.transformer import Transformer
from nnxtrain.units import format_bytes

MAX_SEED = 2**32 - 1  # the seeds that give distinct keys (JAX keeps a seed's low 32 bits)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen; traced scalars, so new values reuse compiled code."""

    temperature: jax.Array  # float32
    top_k: jax.Array  # int32; 0 = no limit
    top_p: jax.Array  # float32 in (0, 1]
    eos_id: jax.Array  # int32; -1 = none


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Decoding:
    """The decode loop's carry: each row's last token (the next input) and its position."""

    cache: KVCache
    token: jax.Array  # [batch] int32
    position: jax.Array  # [batch] int32
    done: jax.Array  # [batch] bool: the row has emitted eos_id
    key: jax.Array  # PRNG key


def generate(
    model: Transformer,
    prompts: jax.Array | np.ndarray,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_id: int | None = None,
    prompt_lengths: jax.Array | np.ndarray | None = None,
) -> jax.Array:
    """The new tokens, int32 [batch, max_new_tokens], eos_id-filled after a row stops."""
    blocks = list(
        stream(
            model,
            prompts,
            max_new_tokens=max_new_tokens,
            block=max(max_new_tokens - 1, 1),
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            eos_id=eos_id,
            prompt_lengths=prompt_lengths,
        )
    )
    out = jnp.concatenate(blocks, axis=1) if blocks else jnp.zeros((len(prompts), 0), jnp.int32)
    if out.shape[1] < max_new_tokens:  # every row stopped at its first token
        out = jnp.pad(out, ((0, 0), (0, max_new_tokens - out.shape[1])), constant_values=eos_id)
    return out


def stream(
    model: Transformer,
    prompts: jax.Array | np.ndarray,
    *,
    max_new_tokens: int,
    block: int = 16,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_id: int | None = None,
    prompt_lengths: jax.Array | np.ndarray | None = None,
) -> Iterator[jax.Array]:
    """`generate`'s tokens as they come: the prefill's [batch, 1], then blocks of up to
    `block` tokens from one compiled decode call each. Stops early once every row has
    emitted eos_id (a block's end is the only place it looks). Bad arguments raise here,
    before anything is generated."""
    lengths = _check(model, prompts, max_new_tokens, temperature, top_k, top_p, prompt_lengths)
    if block < 1:
        raise UserError(f"generate: block must be >= 1, got {block}")
    if not 0 <= seed <= MAX_SEED:
        raise UserError(f"generate: seed must be in 0..{MAX_SEED}, got {seed}")
    if max_new_tokens == 0:
        return iter(())
    # The prefill gives the first token; a block longer than the rest would only size the
    # decode loop (and its compiled code) for tokens nobody asked for.
    block = min(block, max(max_new_tokens - 1, 1))
    _check_cache(model, np.shape(prompts), max_new_tokens)
    return _blocks(
        model, prompts, lengths, max_new_tokens, block, temperature, top_k, top_p, seed, eos_id
    )


def _blocks(
    model: Transformer,
    prompts: jax.Array | np.ndarray,
    lengths: jax.Array,
    max_new_tokens: int,
    block: int,
    temperature: float,
    top_k: int,
    top_p: float,
    seed: int,
    eos_id: int | None,
) -> Iterator[jax.Array]:
    rest = max_new_tokens - 1
    blocks = math.ceil(rest / block)
    sampling = Sampling(
        jnp.float32(temperature),
        jnp.int32(min(top_k, model.cfg.vocab_size)),  # a larger k is every token too
        jnp.float32(top_p),
        jnp.int32(-1 if eos_id is None else eos_id),
    )
    graphdef, params = nnx.split(model)
    greedy = temperature == 0
    prompts = jnp.asarray(prompts, jnp.int32)
    # The last block may run past the tokens asked for: the cache drops those writes
    # (`cache.write`), and their tokens are cut off below.
    cache_len = prompts.shape[1] + max_new_tokens
    state = _prefill(
        graphdef, params, prompts, lengths, sampling, jax.random.key(seed),
        greedy=greedy, cache_len=cache_len,
    )  # fmt: skip
    yield state.token[:, None]
    for i in range(blocks):
        if eos_id is not None and bool(jnp.all(state.done)):
            return
        tokens, state = _decode(graphdef, params, state, sampling, greedy=greedy, steps=block)
        yield tokens[:, : min(block, rest - i * block)]


def _check_cache(model: Transformer, shape: tuple[int, ...], max_new_tokens: int) -> None:
    """Refuses a KV cache that the device's free memory cannot hold twice over."""
    batch, width = shape
    cfg = model.cfg
    dtype = activation_dtype(cfg.dtype)
    length = width + max_new_tokens
    need = 2 * KVCache.nbytes(cfg, batch, length, dtype)
    device = jax.devices()[0]
    free = free_bytes(device)
    if free is None or need <= free:
        return
    lo, hi = 0, length  # the longest cache that fits (a ring's size stops growing)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if 2 * KVCache.nbytes(cfg, batch, mid, dtype) <= free else (lo, mid - 1)
    fits = lo - width
    fix = (
        f"ask for at most {fits} new tokens"
        if fits > 0
        else "use a device with more free memory, or fewer or shorter prompts"
    )
    raise UserError(
        f"generate: {batch} x {length} positions (the prompt and max_new_tokens="
        f"{max_new_tokens}) need {format_bytes(need)} for the KV cache (twice its size: the "
        f"prefill holds a copy), more than the {format_bytes(free)} free on {device}. "
        f"Fix: {fix}"
    )


def _check(
    model: Transformer,
    prompts: jax.Array | np.ndarray,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    prompt_lengths: jax.Array | np.ndarray | None,
) -> jax.Array:
    """Each row's prompt length, int32 [batch]; a bad argument is a one-line UserError."""
    array = prompts if hasattr(prompts, "dtype") else np.asarray(prompts)
    shape, dtype = np.shape(array), array.dtype
    if len(shape) != 2 or 0 in shape or not np.issubdtype(dtype, np.integer):
        raise UserError(
            f"generate: prompts must be integer token ids [batch, prompt_len], got "
            f"{dtype} {tuple(shape)}"
        )
    batch, width = shape
    lengths = np.full(batch, width) if prompt_lengths is None else np.asarray(prompt_lengths)
    if lengths.shape != (batch,) or lengths.min() < 1 or lengths.max() > width:
        raise UserError(
            f"generate: prompt_lengths must be {batch} lengths in 1..{width} (the prompts' "
            f"width), got {lengths.tolist()}"
        )
    limits = (
        (max_new_tokens >= 0, "max_new_tokens", ">= 0", max_new_tokens),
        (temperature >= 0, "temperature", ">= 0 (0 = greedy)", temperature),
        (top_k >= 0, "top_k", ">= 0 (0 = no limit)", top_k),
        (0 < top_p <= 1, "top_p", "in (0, 1]", top_p),
    )
    for ok, name, want, got in limits:
        if not ok:
            raise UserError(f"generate: {name} must be {want}, got {got}")
    ids = np.asarray(array)[np.arange(width) < lengths[:, None]]
    if ids.min() < 0 or ids.max() >= model.cfg.vocab_size:
        raise UserError(
            f"generate: prompt token ids must be in 0..{model.cfg.vocab_size - 1} (the "
            f"model's vocabulary), got {ids.min()}..{ids.max()}"
        )
    cfg = model.cfg
    if int(lengths.max()) + max_new_tokens > cfg.max_len:
        raise UserError(
            f"generate: a prompt of {int(lengths.max())} tokens plus {max_new_tokens} new "
            f"tokens exceeds the model's max_len of {cfg.max_len}. Fix: generate at most "
            f"{max(cfg.max_len - int(lengths.max()), 0)} tokens, or shorten the prompt"
        )
    return jnp.asarray(lengths, jnp.int32)


def choose(logits: jax.Array, s: Sampling, key: jax.Array, greedy: bool) -> jax.Array:
    """The next token of each row, int32 [batch], from logits [batch, vocab]."""
    logits = logits.astype(jnp.float32)
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / s.temperature
    vocab = logits.shape[-1]
    k = jnp.where(s.top_k > 0, jnp.minimum(s.top_k, vocab), vocab)
    desc = jnp.sort(logits, axis=-1)[:, ::-1]
    kth = desc[:, k - 1]  # the k-th largest logit: the top-k threshold
    desc = jnp.where(jnp.arange(vocab) < k, desc, -jnp.inf)
    probs = jax.nn.softmax(desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability of the larger ones
    nucleus = jnp.min(jnp.where(before < s.top_p, desc, jnp.inf), axis=-1)  # top-p threshold
    threshold = jnp.maximum(kth, nucleus)[:, None]
    logits = jnp.where(logits >= threshold, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _after_eos(token: jax.Array, done: jax.Array, s: Sampling) -> tuple[jax.Array, jax.Array]:
    """(token, eos_id where the row had already stopped; done after this token)."""
    token = jnp.where(done, s.eos_id, token)
    return token, done | ((token == s.eos_id) & (s.eos_id >= 0))


@partial(jax.jit, static_argnames=("graphdef", "greedy", "cache_len"))
def _prefill(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    prompts: jax.Array,
    lengths: jax.Array,
    sampling: Sampling,
    key: jax.Array,
    *,
    greedy: bool,
    cache_len: int,
) -> Decoding:
    """Runs the prompts through the model into a fresh cache; chooses the first tokens."""
    model = nnx.merge(graphdef, params)
    # padding may be any value: make it a valid id, so no NaN reaches a (masked) slot; its
    # position -1 keeps it out of the cache (a ring's slot may hold a real key it would hide)
    real = jnp.arange(prompts.shape[1]) < lengths[:, None]
    prompts = jnp.where(real, prompts, 0)
    dtype = activation_dtype(model.cfg.dtype)
    cache = KVCache.empty(model.cfg, prompts.shape[0], cache_len, dtype)
    _, cache = model(prompts, jnp.where(real, jnp.arange(prompts.shape[1]), -1), cache=cache)
    # Each row's last prompt token again, alone, at its position (its slot gets the same
    # keys and values): only these logits are needed, and the prefill's go unused, so XLA
    # drops the output projection at every other position (most of the prefill of a small
    # model with a large vocabulary).
    last_token = jnp.take_along_axis(prompts, (lengths - 1)[:, None], axis=1)
    logits, cache = model(last_token, (lengths - 1)[:, None], cache=cache)
    last = logits[:, 0]
    key, sub = jax.random.split(key)
    token, done = _after_eos(
        choose(last, sampling, sub, greedy), jnp.zeros_like(lengths, bool), sampling
    )
    return Decoding(cache, token, lengths, done, key)


@partial(jax.jit, static_argnames=("graphdef", "greedy", "steps"), donate_argnames=("state",))
def _decode(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    state: Decoding,
    sampling: Sampling,
    *,
    greedy: bool,
    steps: int,
) -> tuple[jax.Array, Decoding]:
    """`steps` decode iterations (fewer once every row is done): ([batch, steps], state)."""
    model = nnx.merge(graphdef, params)
    fill = jnp.maximum(sampling.eos_id, 0)  # what rows that stopped (or the early end) leave
    out = jnp.full((state.token.shape[0], steps), fill, jnp.int32)

    def running(carry: tuple[jax.Array, Decoding, jax.Array]) -> jax.Array:
        i, s, _ = carry
        return (i < steps) & ~jnp.all(s.done)

    def step(carry: tuple[jax.Array, Decoding, jax.Array]) -> tuple[jax.Array, Decoding, jax.Array]:
        i, s, out = carry
        logits, cache = model(s.token[:, None], s.position[:, None], cache=s.cache)
        key, sub = jax.random.split(s.key)
        token, done = _after_eos(choose(logits[:, 0], sampling, sub, greedy), s.done, sampling)
        out = out.at[:, i].set(token)
        return i + 1, Decoding(cache, token, s.position + 1, done, key), out

    _, state, out = jax.lax.while_loop(running, step, (jnp.int32(0), state, out))
    return out, state
