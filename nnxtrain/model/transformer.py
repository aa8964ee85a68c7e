"""The decoder-only Transformer: embedding, stacked decoder layers, final norm, output head.

The layers' weights are stacked on a leading `layers` axis (created with `nnx.vmap`), so
the forward pass can scan one compiled layer body over them (`scan_layers=True`, the default
on accelerators) or unroll them (the default on CPU, where it is faster for small
models); `remat` picks the rematerialisation policy of the layer body. A mixture of
experts with dense layers between its sparse ones holds two stacks, `layers` and
`dense_layers` (`config.layer_plan`), and runs each run of consecutive layers of one stack
as a scan over its slice (`_segments`).

    model = Transformer(ModelConfig(), rngs=nnx.Rngs(0))
    logits = model(tokens)            # tokens [batch, length] -> [batch, length, vocab]
    logits = model(tokens, positions, segment_ids)   # packed documents, see below
    logits, cache = model(tokens, positions, cache=cache)   # generation (nnxtrain.generate)

Packed rows hold several documents: `segment_ids` [batch, length] number them (1, 2, ...;
0 marks padding) and `positions` restart at 0 in each. With segment ids, attention is
causal within each document only: a token never sees another document, so a packed
document's logits are those it has alone. Without them the forward is the plain causal
one, traced exactly as before.

The cache path is separate code (`_cached_layers`, `DecoderLayer.decode`): a call without
a cache, the one the train and eval steps make, traces exactly the plain forward.
"""

from collections import Counter
from typing import Any, overload

import jax
import jax.numpy as jnp
from flax import nnx

from nnxtrain.config import ModelConfig, layer_plan
from nnxtrain.config.moe import DENSE, SPARSE
from nnxtrain.model.cache import KVCache, layer_kinds, stack_index
from nnxtrain.model.layers import (
    BATCH,
    LENGTH,
    DecoderLayer,
    RMSNorm,
    activation_dtype,
    param,
    project,
)
from nnxtrain.model.lora import base_dtype
from nnxtrain.model.moe import layer_stats
from nnxtrain.parallel.sharding import constrain

_REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole layer in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def document_positions(segment_ids: jax.Array) -> jax.Array:
    """Positions [batch, length] that restart at 0 wherever the segment id changes."""
    index = jnp.broadcast_to(jnp.arange(segment_ids.shape[1]), segment_ids.shape)
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]],
        axis=1,
    )
    return index - jax.lax.cummax(jnp.where(starts, index, 0), axis=1)


class Transformer(nnx.Module):
    """A Llama-style decoder language model."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pdt = base_dtype(cfg)
        # Trained in full next to the adapters (model.lora.train_embeddings): kept in
        # param_dtype, not the frozen base's.
        edt = jnp.dtype(cfg.param_dtype) if cfg.lora.train_embeddings else pdt
        self.embed = param(
            rngs,
            (cfg.vocab_size, cfg.emb_dim),
            ("vocab", "embed"),
            edt,
            nnx.initializers.normal(cfg.init_std),
        )

        sizes = Counter(stack for stack, _ in layer_plan(cfg))
        self.layers = _stack(cfg, sizes[SPARSE], dense=False, rngs=rngs)
        if sizes[DENSE]:  # a mixture of experts' dense layers (config/moe.py)
            self.dense_layers = _stack(cfg, sizes[DENSE], dense=True, rngs=rngs)
        self.final_norm = RMSNorm(cfg.emb_dim, cfg.norm_eps, pdt, rngs=rngs, offset=cfg.norm_offset)
        if not cfg.tie_embeddings:
            self.lm_head = param(
                rngs,
                (cfg.emb_dim, cfg.vocab_size),
                ("embed", "vocab"),
                edt,
                nnx.initializers.normal(cfg.init_std),
            )

    @overload
    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array: ...

    @overload
    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: None = None,
        *,
        cache: KVCache,
    ) -> tuple[jax.Array, KVCache]: ...

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        *,
        cache: KVCache | None = None,
    ) -> jax.Array | tuple[jax.Array, KVCache]:
        """Logits [batch, length, vocab] in the activation dtype for tokens [batch, length].

        `segment_ids` [batch, length] confine attention to each document (see the module
        docstring); without `positions`, they restart at each document then.

        With a `cache` (generation only, see `nnxtrain.model.cache`), the tokens' keys and
        values are written into it at their positions (consecutive per row) and attention
        reads the cached slots; returns (logits, the updated cache).
        """
        if cache is None:
            return self.logits(self.hidden(tokens, positions, segment_ids))
        if segment_ids is not None:
            raise ValueError("segment_ids are for training's packed rows, not a KV cache")
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        x, cache = self._cached_layers(self._embed(tokens), positions, cache)
        return self.logits(self.final_norm(x)), cache

    def hidden(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        """The final-normed hidden states [batch, length, emb_dim] that `logits` projects:
        the training forward up to the output head (a loss that projects a chunk of
        positions at a time never holds the whole [batch, length, vocab] logits)."""
        return self.routed_hidden(tokens, positions, segment_ids)[0]

    def routed_hidden(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
    ) -> tuple[jax.Array, dict[str, jax.Array] | None]:
        """`hidden`, and a mixture of experts' router statistics per layer (each
        `moe.ROUTER_STATS` leaf stacked [layers, ...]; None for a dense model): what the
        training loss needs for the load-balancing loss (`moe.aux_losses`)."""
        if positions is None:
            positions = (
                jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
                if segment_ids is None
                else document_positions(segment_ids)
            )
        x, stats = self._routed_layers(self._embed(tokens), positions, segment_ids)
        return self.final_norm(x), stats

    def logits(self, x: jax.Array) -> jax.Array:
        """Logits [batch, length, vocab] in the activation dtype of hidden states `x`."""
        dt = activation_dtype(self.cfg.dtype)
        head = self.embed[...].T if self.cfg.tie_embeddings else self.lm_head[...]
        logits = project(x, head.astype(dt))
        if cap := self.cfg.final_softcap:  # Gemma 2: in training too (every loss calls this)
            logits = (cap * jnp.tanh(logits.astype(jnp.float32) / cap)).astype(dt)
        return constrain(logits, "logits", (BATCH, LENGTH, "activation_vocab"))

    def _embed(self, tokens: jax.Array) -> jax.Array:
        dt = activation_dtype(self.cfg.dtype)
        x = jnp.take(self.embed[...].astype(dt), tokens, axis=0)
        if self.cfg.embed_scale:  # Gemma: sqrt(emb_dim), rounded to the dtype as HF does
            x = x * jnp.asarray(self.cfg.emb_dim**0.5, dt)
        return constrain(x, "embed/out", (BATCH, LENGTH, "activation_embed"))

    def _scan(self) -> bool:
        scan = self.cfg.scan_layers
        return scan if scan is not None else jax.default_backend() != "cpu"

    def _layers(
        self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None
    ) -> jax.Array:
        """The training forward through the stacked layers, scanned or unrolled."""
        return self._routed_layers(x, positions, segment_ids)[0]

    def _routed_layers(
        self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None
    ) -> tuple[jax.Array, Any]:
        """`_layers`, and the layers' router statistics, stacked (None without experts)."""
        cfg = self.cfg
        flags = self._local_flags()
        found = []
        for stack, first, count in self._segments():
            graphdef, stacked = self._split(stack, first, count)

            def body(
                h: jax.Array, xs: tuple[nnx.State, jax.Array | None], graphdef: Any = graphdef
            ) -> tuple[jax.Array, Any]:
                layer_state, local = xs
                layer = nnx.merge(graphdef, layer_state)
                return layer(h, positions, segment_ids, local), layer_stats(layer)

            if cfg.remat != "none":
                body = jax.checkpoint(body, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=False)
            if self._scan():
                local_flags = None if flags is None else flags[first : first + count]
                x, stats = jax.lax.scan(body, x, (stacked, local_flags))
                found += [] if stats is None else [stats]
                continue
            for i in range(count):
                local = None if flags is None else flags[first + i]
                x, stats = body(x, (jax.tree.map(lambda a, i=i: a[i], stacked), local))
                found += [] if stats is None else [jax.tree.map(lambda a: a[None], stats)]
        if not found:
            return x, None
        return x, jax.tree.map(lambda *a: jnp.concatenate(a), *found)

    def _segments(self) -> list[tuple[str, int, int]]:
        """The runs of consecutive layers held in one stack, in order: (the stack, the
        model's layer that starts the run, its length). One run, `layers`, unless a mixture
        of experts keeps dense layers; each run is scanned over its slice of its stack."""
        runs: list[tuple[str, int, int]] = []
        for i, (stack, _) in enumerate(layer_plan(self.cfg)):
            if runs and runs[-1][0] == stack:
                runs[-1] = (stack, runs[-1][1], runs[-1][2] + 1)
            else:
                runs.append((stack, i, 1))
        return runs

    def _split(self, stack: str, first: int, count: int) -> tuple[nnx.GraphDef, nnx.State]:
        """The graph of one layer of `stack`, and the stacked state of the run of `count`
        layers starting at the model's layer `first` (the whole stack: no slice)."""
        graphdef, stacked = nnx.split(getattr(self, stack))
        start = layer_plan(self.cfg)[first][1]
        if (start, count) == (0, jax.tree.leaves(stacked)[0].shape[0]):
            return graphdef, stacked
        return graphdef, jax.tree.map(lambda a: a[start : start + count], stacked)

    def _local_flags(self) -> jax.Array | None:
        """Per layer, whether it is a sliding-window layer, where only some are (Gemma:
        every `global_every`-th layer attends to all keys); None where all layers alike.
        A scan input, so that one compiled layer body serves both kinds."""
        cfg = self.cfg
        if not (cfg.sliding_window and cfg.global_every):
            return None
        return jnp.asarray([(i + 1) % cfg.global_every != 0 for i in range(cfg.num_layers)])

    def _cached_layers(
        self, x: jax.Array, positions: jax.Array, cache: KVCache
    ) -> tuple[jax.Array, KVCache]:
        """The generation forward: the cache is carried through the layers whole, and each
        layer writes its own slice of its kind's stack (`nnxtrain.model.cache`), so no
        layer's keys are copied out and stacked again."""
        flags, index = self._local_flags(), stack_index(self.cfg)
        for stack, first, count in self._segments():
            graphdef, stacked = self._split(stack, first, count)

            def body(
                carry: tuple[jax.Array, KVCache],
                xs: tuple[nnx.State, jax.Array | int, jax.Array | bool | None],
                graphdef: Any = graphdef,
            ) -> tuple[tuple[jax.Array, KVCache], None]:
                (h, kv), (layer_state, i, local) = carry, xs
                return nnx.merge(graphdef, layer_state).decode(h, positions, kv, i, local), None

            if self._scan():
                run = slice(first, first + count)
                xs = (stacked, jnp.asarray(index[run]), None if flags is None else flags[run])
                (x, cache), _ = jax.lax.scan(body, (x, cache), xs)
                continue
            for i in range(first, first + count):  # the kinds static: no lax.cond
                local = None if flags is None else layer_kinds(self.cfg)[i]
                layer = jax.tree.map(lambda a, j=i - first: a[j], stacked)
                (x, cache), _ = body((x, cache), (layer, index[i], local))
        return x, cache


def _stack(cfg: ModelConfig, count: int, *, dense: bool, rngs: nnx.Rngs) -> DecoderLayer:
    """`count` decoder layers with their weights stacked on a leading `layers` axis."""

    @nnx.split_rngs(splits=count)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(rngs: nnx.Rngs) -> DecoderLayer:
        return DecoderLayer(cfg, rngs=rngs, dense=dense)

    return make(rngs)
