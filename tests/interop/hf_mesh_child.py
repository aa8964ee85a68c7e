"""Child process of test_hf_meshes: loads an HF directory onto meshes of 8 simulated CPU
devices and prints, per mesh, the max abs diff of its logits from transformers' (saved by
the parent) and how the parameters landed. Needs XLA_FLAGS set before JAX starts. With
`adapter=DIR:LOGITS.npy`, the same for the model with that PEFT LoRA adapter on it, its
arrays placed by their logical axes (as a run places them), against PEFT's logits. Each
`family=NAME:DIR:LOGITS.npy` is one more HF directory (another family) run on every mesh
with the same tokens, in this process: one JAX start-up serves them all.

With `moe=DIR:TOKENS.npy:LOGITS.npy`, a mixture of experts (issue 28, `moe_report`).

    python hf_mesh_child.py HF_DIR TOKENS.npy LOGITS.npy [adapter=DIR:LOGITS.npy]
        [family=NAME:DIR:LOGITS.npy ...] [moe=DIR:TOKENS.npy:LOGITS.npy] d,f,t ...
"""

import dataclasses
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from rich.console import Console

import nnxtrain.interop.hf as hf
from nnxtrain.config import MeshConfig
from nnxtrain.interop.peft import attach_adapter
from nnxtrain.parallel.mesh import batch_sharding, build_mesh
from nnxtrain.parallel.sharding import DEFAULT_RULES, state_shardings, use_rules
from nnxtrain.train.loss import batch_loss_sums, summarize


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


def moe_report(path: str, tokens: np.ndarray, reference: np.ndarray) -> dict:
    """An HF mixture of experts loaded straight into the shards of expert=4 x fsdp=2 (the
    experts split 4 ways, tokens sent to them all-to-all): its logits against
    transformers', and its logits and gradients of the training loss (the load-balancing
    loss in it) against the same model on one device; the layers scanned on the mesh,
    unrolled on the one device (CPU's default), so that both stacks are checked."""

    def loss(graphdef: nnx.GraphDef, state: nnx.State, toks: jax.Array) -> tuple:
        model = nnx.merge(graphdef, state)
        batch = {"inputs": toks, "targets": toks, "weights": jnp.ones(toks.shape)}
        return summarize(batch_loss_sums(model, batch, 0.0))["loss"], model(toks)

    grad = jax.jit(jax.value_and_grad(loss, argnums=1, has_aux=True), static_argnums=0)
    (_, one_logits), one_grads = grad(*nnx.split(hf.load(path, param_dtype="float32")), tokens)
    mesh = build_mesh(MeshConfig(data=1, fsdp=2, tensor=1, expert=4))
    model = hf.load(path, param_dtype="float32", mesh=mesh)
    model.cfg = dataclasses.replace(model.cfg, scan_layers=True)  # one device: unrolled
    graphdef, state = nnx.split(model)
    with use_rules(mesh, DEFAULT_RULES):
        toks = jax.device_put(tokens, batch_sharding(mesh))
        (_, logits), grads = grad(graphdef, state, toks)
        hlo = jax.jit(grad, static_argnums=0).lower(graphdef, state, toks).as_text()
    w_gate = dict(nnx.to_flat_state(state))[("layers", "mlp", "w_gate")].get_value()
    grads, one_grads = jax.device_get((grads, one_grads))
    diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), grads, one_grads)
    return {
        "max_abs_diff": float(np.max(np.abs(np.asarray(logits) - reference))),
        "one_device_diff": float(np.max(np.abs(np.asarray(logits) - np.asarray(one_logits)))),
        "grad_diff": max(jax.tree.leaves(diffs)),
        "w_gate_spec": str(w_gate.sharding.spec),
        "w_gate_shard": list(w_gate.addressable_shards[0].data.shape),
        "all_to_all": hlo.count("all_to_all"),
    }


def main() -> None:
    path, tokens, reference = sys.argv[1], np.load(sys.argv[2]), np.load(sys.argv[3])
    lora = [a.split("=", 1)[1].split(":") for a in sys.argv[4:] if a.startswith("adapter=")]
    families = [a.split("=", 1)[1].split(":") for a in sys.argv[4:] if a.startswith("family=")]
    moe = [a.split("=", 1)[1].split(":") for a in sys.argv[4:] if a.startswith("moe=")]
    report = {}
    for moe_dir, moe_tokens, moe_logits in moe:
        report["moe"] = moe_report(moe_dir, np.load(moe_tokens), np.load(moe_logits))
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
