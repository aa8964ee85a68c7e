"""Child process of test_hf_meshes: loads an HF directory onto meshes of 8 simulated CPU
devices and prints, per mesh, the max abs diff of its logits from transformers' (saved by
the parent) and how the parameters landed. Needs XLA_FLAGS set before JAX starts.

    python hf_mesh_child.py HF_DIR TOKENS.npy LOGITS.npy data,fsdp,tensor ...
"""

import json
import sys

import jax
import numpy as np
from flax import nnx

import nnxtrain.interop.hf as hf
from nnxtrain.config import MeshConfig
from nnxtrain.parallel.mesh import batch_sharding, build_mesh
from nnxtrain.parallel.sharding import DEFAULT_RULES, use_rules


def forward(graphdef: nnx.GraphDef, state: nnx.State, toks: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, state)(toks)


def main() -> None:
    path, tokens, reference = sys.argv[1], np.load(sys.argv[2]), np.load(sys.argv[3])
    report = {}
    for shape in sys.argv[4:]:
        data, fsdp, tensor = map(int, shape.split(","))
        mesh = build_mesh(MeshConfig(data=data, fsdp=fsdp, tensor=tensor))
        model = hf.load(path, param_dtype="float32", mesh=mesh)
        graphdef, state = nnx.split(model)
        params = dict(nnx.to_flat_state(state))
        wq = params[("layers", "attn", "wq")].get_value()
        embed = params[("embed",)].get_value()

        with use_rules(mesh, DEFAULT_RULES):
            toks = jax.device_put(tokens, batch_sharding(mesh))
            logits = jax.jit(forward, static_argnums=0)(graphdef, state, toks)
        report[shape] = {
            "max_abs_diff": float(np.max(np.abs(np.asarray(logits) - reference))),
            "wq_spec": str(wq.sharding.spec),
            "wq_shard": list(wq.addressable_shards[0].data.shape),
            "embed_spec": str(embed.sharding.spec),
            "embed_shard": list(embed.addressable_shards[0].data.shape),
            "devices": len(wq.sharding.device_set),
        }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
