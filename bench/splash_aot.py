"""Splash against xla attention on TPU, compiled ahead of time on this host (no TPU needed).

One attention layer (projections, rotary, attention, output) of bfloat16 activations,
forward and backward, is lowered and compiled for a TPU topology's devices
(`jax.experimental.topologies`; needs libtpu: `pip install -e '.[tpu]'`) on a mesh of
fsdp × tensor, with the model's sharding rules, once per kernel and sequence length.
Prints, per device, the compiled program's temporary bytes (`memory_analysis()`) and
whether it holds a `tpu_custom_call` (the Pallas kernel); `--json` prints one JSON line.

xla's temporaries grow with length² (the scores, and their gradient, sit in memory);
splash's grow with length.

    python bench/splash_aot.py [--topology v6e:2x4] [--seq 2048 8192] [--heads 4] [--rows 1]
        [--tensor 2] [--kernels xla splash] [--segments] [--json]

libtpu prints warnings on start-up on a host without TPUs; setting
TPU_ACCELERATOR_TYPE (e.g. v6e-8) and TPU_WORKER_HOSTNAMES=localhost silences them,
JAX_PLATFORMS=cpu keeps JAX from trying a TPU backend here, and ALLOW_MULTIPLE_LIBTPU_LOAD=1
lets two such processes run at once.
"""

import argparse
import json
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from nnxtrain.config import ModelConfig
from nnxtrain.model.layers import Attention
from nnxtrain.parallel.sharding import DEFAULT_RULES, state_shardings, use_rules

# Full-width heads (a real TPU shape for the kernels' per-head work), few of them by
# default so that the compile is quick; kv heads are half the query heads.
HEAD_DIM = 128


def layer_config(attention: str, heads: int) -> ModelConfig:
    return ModelConfig(
        emb_dim=heads * 64,
        num_heads=heads,
        num_kv_heads=heads // 2,
        head_dim=HEAD_DIM,
        dtype="bfloat16",
        max_len=1 << 20,
        attention=attention,
    )


def compile_layer(
    cfg: ModelConfig, seq: int, mesh: Mesh, batch: int, segments: bool
) -> tuple[Any, float]:
    """The compiled forward + backward of one attention layer, and its compile seconds."""
    graphdef, params = nnx.split(nnx.eval_shape(lambda: Attention(cfg, rngs=nnx.Rngs(0))))
    placed = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        params,
        state_shardings(params, mesh, DEFAULT_RULES),
    )
    rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    x = jax.ShapeDtypeStruct((batch, seq, cfg.emb_dim), jnp.bfloat16, sharding=rows)
    ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=rows)

    def loss(params: nnx.State, x: jax.Array, positions: jax.Array, seg: jax.Array) -> jax.Array:
        out = nnx.merge(graphdef, params)(x, positions, seg if segments else None)
        return jnp.sum(jnp.square(out.astype(jnp.float32)))

    step = jax.jit(jax.grad(loss, argnums=(0, 1)))
    start = time.perf_counter()
    with use_rules(mesh, DEFAULT_RULES):
        compiled = step.lower(placed, x, ids, ids).compile()
    return compiled, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topology", default="v6e:2x4")
    parser.add_argument("--seq", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--tensor", type=int, default=2, help="mesh tensor size; fsdp is the rest")
    parser.add_argument("--heads", type=int, default=4, help="query heads (width: 64 per head)")
    parser.add_argument("--rows", type=int, default=1, help="examples per fsdp device")
    parser.add_argument("--kernels", nargs="+", default=["xla", "splash"])
    parser.add_argument("--segments", action="store_true", help="with document segment ids")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    devices = topologies.get_topology_desc(platform="tpu", topology_name=args.topology).devices
    fsdp = len(devices) // args.tensor
    mesh = Mesh(np.array(devices).reshape(1, fsdp, args.tensor), ("data", "fsdp", "tensor"))
    results = []
    for seq in args.seq:
        for attention in args.kernels:
            cfg = layer_config(attention, args.heads)
            compiled, seconds = compile_layer(cfg, seq, mesh, fsdp * args.rows, args.segments)
            results.append(
                {
                    "attention": attention,
                    "seq": seq,
                    "temp_bytes": compiled.memory_analysis().temp_size_in_bytes,
                    "tpu_custom_call": "tpu_custom_call" in compiled.as_text(),
                    "compile_s": round(seconds, 2),
                }
            )
    if args.json:
        print(json.dumps({"device": devices[0].device_kind, "results": results}))
        return
    print(
        f"{devices[0].device_kind} × {len(devices)}, mesh fsdp={fsdp} tensor={args.tensor}, "
        f"{args.rows} example(s) per fsdp device, {args.heads} heads of {HEAD_DIM}"
    )
    for r in results:
        print(
            f"{r['attention']:>6} seq {r['seq']:>6}: temp {r['temp_bytes'] / 2**20:9.1f} MiB "
            f"per device, tpu_custom_call {r['tpu_custom_call']}, compiled in {r['compile_s']} s"
        )


if __name__ == "__main__":
    main()
