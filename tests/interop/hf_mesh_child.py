"""Child process of test_hf_meshes: loads an HF directory onto meshes of 8 simulated CPU
devices and prints, per mesh, the max abs diff of its logits from transformers' (saved by
the parent) and how the parameters landed. Needs XLA_FLAGS set before JAX starts. With
`adapter=DIR:LOGITS.npy`, the same for the model with that PEFT LoRA adapter on it, its
arrays placed by their logical axes (as a run places them), against PEFT's logits. Each
`family=NAME:DIR:LOGITS.npy` is one more HF directory (another family) run on every mesh
with the same tokens, in this process: one JAX start-up serves them all.

    python hf_mesh_child.py HF_DIR TOKENS.npy LOGITS.npy [adapter=DIR:LOGITS.npy]
        [family=NAME:DIR:LOGITS.npy ...] d,f,t ...
"""

import json
import sys

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from rich.console import Console

import nnxtrain.interop.hf as hf
from nnxtrain.config import MeshConfig
from nnxtrain.interop.peft import attach_adapter
from nnxtrain.parallel.mesh import batch_sharding, build_mesh
from nnxtrain.parallel.sharding import DEFAULT_RULES, state_shardings, use_rules


def forward(graphdef: nnx.GraphDef, state: nnx.State, toks: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, state)(toks)


def max_abs_diff(model: nnx.Module, toks: jax.Array, mesh: Mesh, reference: str) -> float:
    """Of `model`'s logits of `toks` on `mesh` from those saved in `reference`."""
    graphdef, state = nnx.split(model)
    with use_rules(mesh, DEFAULT_RULES):
        logits = jax.jit(forward, static_argnums=0)(graphdef, state, toks)
    return float(np.max(np.abs(np.asarray(logits) - np.load(reference))))


def with_adapter(model: nnx.Module, adapter: str, mesh: Mesh) -> tuple[nnx.GraphDef, nnx.State]:
    """The model with a PEFT adapter on it, every array placed by its logical axes."""
    graphdef, state = nnx.split(attach_adapter(model, adapter, Console(quiet=True)))
    return graphdef, jax.device_put(state, state_shardings(state, mesh, DEFAULT_RULES))


def main() -> None:
    path, tokens, reference = sys.argv[1], np.load(sys.argv[2]), np.load(sys.argv[3])
    lora = [a.split("=", 1)[1].split(":") for a in sys.argv[4:] if a.startswith("adapter=")]
    families = [a.split("=", 1)[1].split(":") for a in sys.argv[4:] if a.startswith("family=")]
    report = {}
    for shape in [a for a in sys.argv[4:] if "=" not in a]:
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
        for adapter, logits_file in lora:
            graphdef, state = with_adapter(model, adapter, mesh)
            with use_rules(mesh, DEFAULT_RULES):
                logits = jax.jit(forward, static_argnums=0)(graphdef, state, toks)
            params = dict(nnx.to_flat_state(state))
            a = params[("layers", "attn", "q_lora", "a")].get_value()
            b = params[("layers", "attn", "q_lora", "b")].get_value()
            report[shape]["lora"] = {
                "max_abs_diff": float(np.max(np.abs(np.asarray(logits) - np.load(logits_file)))),
                "q_a_shard": list(a.addressable_shards[0].data.shape),
                "q_b_shard": list(b.addressable_shards[0].data.shape),
            }
        report[shape]["families"] = {
            name: max_abs_diff(hf.load(where, param_dtype="float32", mesh=mesh), toks, mesh, ref)
            for name, where, ref in families
        }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
