"""A trained model from a run's checkpoint, for the commands that use one without
training it (`nnxtrain-export`, `nnxtrain-generate`).

    ckpt, cfg, model = read_model("runs/a")   # the Transformer of the latest checkpoint

The parameters are read by `checkpoint_reader.read_params`, which checks their digests.
A LoRA checkpoint holds adapters only (`nnxtrain.checkpoint.lora`): its base is built as
the run built it, from `run.seed`, then `load_base` (the caller's: `run.init_from`'s
weights) fills it in, and the base must be the one the adapters were trained on.
"""

from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from nnxtrain.checkpoint.lora import check_base
from nnxtrain.checkpoint.reader import Checkpoint, locate, read_params
from nnxtrain.config import Config, from_dict
from nnxtrain.model import Transformer, trainable

BaseLoader = Callable[[Config, Any], Any]  # (the run's config, params) -> params


def read_model(
    path: str, step: int | None = None, step_key: str = "step", load_base: BaseLoader | None = None
) -> tuple[Checkpoint, Config, Transformer]:
    """(the checkpoint, its config, the model with its parameters) of `locate(path, step)`:
    the model's shape from the config saved with it, on JAX's default device."""
    ckpt = locate(path, step, step_key)
    keys = ("model", "data", "run") if ckpt.lora_base is not None else ("model", "data")
    cfg = from_dict(Config, {k: v for k, v in ckpt.config.items() if k in keys})
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if ckpt.lora_base is not None:
        return ckpt, cfg, _lora_model(ckpt, cfg, device, load_base)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0))))
    target = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), nnx.to_pure_dict(state)
    )
    nnx.replace_by_pure_dict(state, read_params(ckpt, target))
    return ckpt, cfg, nnx.merge(graphdef, state)


def _lora_model(
    ckpt: Checkpoint, cfg: Config, device: Any, load_base: BaseLoader | None
) -> Transformer:
    """The base as the run built it, with the checkpoint's adapters (and embeddings)."""
    assert ckpt.lora_base is not None
    init_from = str(ckpt.lora_base.get("init_from") or "")
    seed = int(ckpt.lora_base.get("seed") or 0)
    model = jax.jit(
        lambda: nnx.state(Transformer(cfg.model, rngs=nnx.Rngs(seed))), out_shardings=device
    )()
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(seed))))
    params = model
    if init_from:
        if load_base is None:
            raise AssertionError("a LoRA checkpoint of a run.init_from base needs load_base")
        run = cfg.run.__class__(**{**vars(cfg.run), "init_from": init_from})
        params = load_base(cfg.__class__(**{**vars(cfg), "run": run}), params)
    check_base(ckpt.lora_base, ckpt.path, params, ckpt.config)
    keep, _ = nnx.split_state(params, trainable(cfg.model), ...)
    target = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), nnx.to_pure_dict(keep)
    )
    nnx.replace_by_pure_dict(params, read_params(ckpt, target))
    return nnx.merge(graphdef, params)
