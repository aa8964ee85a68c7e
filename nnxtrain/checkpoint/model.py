"""A trained model from a run's checkpoint, for the commands that use one without
training it (`nnxtrain-export`, `nnxtrain-generate`).

    ckpt, cfg, model = read_model("runs/a")   # the Transformer of the latest checkpoint

The parameters are read by `checkpoint_reader.read_params`, which checks their digests.
"""

import jax
from flax import nnx

from nnxtrain.checkpoint.reader import Checkpoint, locate, read_params
from nnxtrain.config import Config, from_dict
from nnxtrain.model import Transformer


def read_model(
    path: str, step: int | None = None, step_key: str = "step"
) -> tuple[Checkpoint, Config, Transformer]:
    """(the checkpoint, its config, the model with its parameters) of `locate(path, step)`:
    the model's shape from the config saved with it, on JAX's default device."""
    ckpt = locate(path, step, step_key)
    cfg = from_dict(Config, {k: v for k, v in ckpt.config.items() if k in ("model", "data")})
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0))))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), nnx.to_pure_dict(state)
    )
    nnx.replace_by_pure_dict(state, read_params(ckpt, target))
    return ckpt, cfg, nnx.merge(graphdef, state)
