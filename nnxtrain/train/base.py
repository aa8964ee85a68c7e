"""The state a run starts its loop from: fresh, with `run.init_from`'s weights, or a
restored LoRA checkpoint's adapters over their frozen base.

A LoRA checkpoint holds no base (`nnxtrain.checkpoint.lora`): what the checkpointer
restores has the base's leaves abstract, and `starting_state` fills them in from a fresh
initialisation and `run.init_from`, exactly as the run that saved the adapters built its
base. `model.lora.adapter` (a PEFT adapter) is read over a fresh start.
"""

import dataclasses

import jax
from jax.sharding import Mesh
from rich.console import Console

from nnxtrain.config import Config
from nnxtrain.interop.init_from import load_params as load_init_from
from nnxtrain.train.compile import StatePlan
from nnxtrain.train.step import TrainState


def incomplete(state: TrainState | None) -> bool:
    """Whether the loop cannot start from `state`: none yet, or its base is still abstract."""
    return state is None or any(
        isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(state.params)
    )


def starting_state(
    config: Config, plan: StatePlan, state: TrainState | None, mesh: Mesh | None, console: Console
) -> TrainState:
    """`state` (restored: with its base filled in) or a fresh one, `run.init_from`'s
    weights and `model.lora.adapter`'s adapters read into it."""
    if state is not None and not incomplete(state):
        return state  # restored whole: a rerun resumes it
    fresh = plan.initialize()
    params = fresh.params
    if config.run.init_from:
        params = load_init_from(config, params, mesh, console)
    if state is None:
        if config.model.lora.adapter:
            from nnxtrain.interop.peft import load_adapter

            params = load_adapter(config, params, console)
        return dataclasses.replace(fresh, params=params)
    merged = jax.tree.map(
        lambda restored, built: built if isinstance(restored, jax.ShapeDtypeStruct) else restored,
        state.params,
        params,
    )
    return dataclasses.replace(state, params=merged)
