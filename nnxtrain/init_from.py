"""`run.init_from=PATH`: training starts from pretrained weights, those of a Hugging Face
directory or of an nnxtrain run's checkpoint; the step and the optimizer start fresh.

    nnxtrain run.init_from=hf/TinyLlama data=text data.path=corpus.txt +experiment=finetune
    nnxtrain run.init_from=runs/a run.dir=runs/b   # the parameters of a's latest checkpoint

The config is resolved as it is composed (`nnxtrain.config.init_from`: the model's shape
and the tokenizer of PATH). `load` reads the weights straight into the run's shards, in
model.param_dtype. The Trainer calls it after initialising the state, and only when
nothing was restored: a rerun of an interrupted fine-tune resumes the fine-tune.
"""

import dataclasses
import time

import jax
from flax import nnx
from jax.sharding import Mesh
from rich.console import Console

from nnxtrain import checkpoint_reader
from nnxtrain.config import Config
from nnxtrain.config.init_from import resolve, source
from nnxtrain.hf import load as load_hf
from nnxtrain.sharding import merge_rules
from nnxtrain.step import TrainState

__all__ = ["load", "resolve"]


def load(config: Config, state: TrainState, mesh: Mesh | None, console: Console) -> TrainState:
    """`state` with the parameters of `run.init_from`, each array in the shards (and the
    dtype) of the one it replaces; the step and the optimizer state are kept (fresh)."""
    t0, src = time.perf_counter(), source(config.run.init_from)
    if src.kind == "hf":
        rules = merge_rules(config.mesh.rules)
        dtype = config.model.param_dtype
        model = load_hf(src.path, param_dtype=dtype, mesh=mesh, rules=rules)
        loaded = nnx.to_pure_dict(nnx.state(model))
        where = src.path
    else:
        assert src.checkpoint is not None
        target = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
            nnx.to_pure_dict(state.params),
        )
        loaded = checkpoint_reader.read_params(src.checkpoint, target)
        where = f"step {src.checkpoint.step} ({src.checkpoint.path})"
    params = jax.tree.map(lambda x: x, state.params)  # a new State; `state` stays as it was
    shardings = jax.tree.map(lambda a: a.sharding, nnx.to_pure_dict(state.params))
    nnx.replace_by_pure_dict(params, jax.device_put(loaded, shardings))
    console.print(
        f"init_from: took the parameters of {where} in {time.perf_counter() - t0:.2f} s "
        "(step 0, a fresh optimizer)",
        markup=False,
        highlight=False,
    )
    return dataclasses.replace(state, params=params)
