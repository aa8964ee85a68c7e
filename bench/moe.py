"""The mixture-of-experts block's speed on CPU, three ways side by side in one run, and
qwen3_30b_a3b's train step memory on a TPU target (a dry run: compiled, nothing allocated).

Speed: tokens/s of one MoE block forward and backward (jitted, `--steps` timed calls after
a warm-up) at 8 experts (top-2) and 64 experts (top-8), each computed as
- ragged: dropless, tokens sorted by expert, `jax.lax.ragged_dot` (`model.moe.impl=ragged`,
  the default on accelerators; JAX lowers it on CPU to a dense product per expert);
- blocks: dropless, expert-sorted tiles and one batched matmul (`impl=blocks`, the default
  on CPU);
- dense-masked: every expert on every token, masked to the top-k (the naive dropless way,
  written here);
- capacity: nnxtrain's capacity mode, factor 1.25 (`model.moe.capacity_factor`).
Goal (issue 28): the dropless default >= 3x dense-masked at 64 experts top-8.

Memory: `model=qwen3_30b_a3b` compiled for `--target` (default tpu:v5p-64; needs libtpu,
`pip install -e '.[tpu]'`) at `--seq` tokens, one sequence per device.

    python bench/moe.py [--tokens 2048] [--emb 256] [--steps 10] [--target tpu:v5p-64]
        [--skip-speed] [--skip-memory] [extra overrides of the memory run]
"""

import argparse
import dataclasses
import json
import tempfile
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from nnxtrain import Trainer, compose
from nnxtrain.config import ModelConfig, MoeConfig
from nnxtrain.model.moe import MoE, route
from nnxtrain.train.compile import CompiledMemory
from nnxtrain.units import format_bytes


def dense_masked(moe: MoE, x: jax.Array) -> jax.Array:
    """Every expert on every token, the outputs weighted by the top-k (zero elsewhere)."""
    flat = x.reshape(-1, x.shape[-1])
    _, _, weights, ids = route(flat, moe.router[...], moe.top_k, moe.norm_topk_prob)
    rows = jnp.arange(flat.shape[0])[:, None]
    mask = jnp.zeros((flat.shape[0], moe.router.shape[1]), flat.dtype).at[rows, ids].set(weights)
    gate = jnp.einsum("td,edm->etm", flat, moe.w_gate[...])
    up = jnp.einsum("td,edm->etm", flat, moe.w_up[...])
    out = jnp.einsum("etm,emd->etd", jax.nn.silu(gate) * up, moe.w_down[...])
    return jnp.einsum("etd,te->td", out, mask).reshape(x.shape)


def rate(moe: MoE, x: jax.Array, fn: Callable[[MoE, jax.Array], jax.Array], steps: int) -> float:
    """Tokens/s of forward + backward (gradients of every weight and the input)."""
    graphdef, params = nnx.split(moe)

    def loss(p: nnx.State, x: jax.Array) -> jax.Array:
        return jnp.sum(fn(nnx.merge(graphdef, p), x) ** 2)

    step = jax.jit(jax.grad(loss, argnums=(0, 1)))
    jax.block_until_ready(step(params, x))  # compile and warm up
    start = time.perf_counter()
    for _ in range(steps):
        out = step(params, x)
    jax.block_until_ready(out)
    return steps * x.shape[0] * x.shape[1] / (time.perf_counter() - start)


def speed(tokens: int, emb: int, steps: int) -> dict[str, dict[str, float]]:
    out = {}
    for experts, top_k in ((8, 2), (64, 8)):
        moe_cfg = MoeConfig(experts=experts, top_k=top_k, mlp_dim=emb // 2)
        cfg = ModelConfig(emb_dim=emb, dtype="float32", moe=moe_cfg)
        capped = dataclasses.replace(cfg, moe=dataclasses.replace(moe_cfg, capacity_factor=1.25))
        x = jax.random.normal(jax.random.key(0), (tokens // 256, 256, emb))
        impl = {
            i: dataclasses.replace(cfg, moe=dataclasses.replace(moe_cfg, impl=i))
            for i in ("ragged", "blocks")
        }
        row = {
            "ragged": rate(MoE(impl["ragged"], rngs=nnx.Rngs(0)), x, lambda m, x: m(x), steps),
            "blocks": rate(MoE(impl["blocks"], rngs=nnx.Rngs(0)), x, lambda m, x: m(x), steps),
            "dense_masked": rate(MoE(cfg, rngs=nnx.Rngs(0)), x, dense_masked, steps),
            "capacity": rate(MoE(capped, rngs=nnx.Rngs(0)), x, lambda m, x: m(x), steps),
        }
        out[f"{experts} experts top-{top_k}"] = row
        print(
            f"{experts} experts top-{top_k}, {tokens} tokens, emb {emb}, expert mlp {emb // 2}: "
            + ", ".join(f"{k} {v:,.0f} tok/s" for k, v in row.items())
            + "; over dense-masked: "
            + ", ".join(f"{k} {v / row['dense_masked']:.2f}x" for k, v in row.items()),
            flush=True,
        )
    return out


def memory(target: str, seq: int, overrides: list[str]) -> dict[str, int]:
    args = ["model=qwen3_30b_a3b", "run.dry_run=true", "run.eval_every=0", "callbacks=none"]
    args += ["run.batch_size=-1", f"run.seq_len={seq}", f"run.loss_chunk={min(seq, 512)}"]
    args += [f"mesh.target={target}", f"run.dir={tempfile.mkdtemp()}", *overrides]
    trainer = Trainer(compose(args))
    trainer.fit()
    mem = CompiledMemory.of(trainer.compiled).as_dict()
    print(
        f"qwen3_30b_a3b on {target}, {seq} tokens per device: total "
        f"{format_bytes(mem['total'])} per device (argument {format_bytes(mem['argument'])}, "
        f"temp {format_bytes(mem['temp'])})",
        flush=True,
    )
    return mem


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--emb", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--target", default="tpu:v5p-64")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("overrides", nargs="*", help="extra overrides of the memory run")
    args = parser.parse_args()
    report: dict = {}
    if not args.skip_speed:
        report["speed"] = speed(args.tokens, args.emb, args.steps)
    if not args.skip_memory:
        report["memory"] = memory(args.target, args.seq, args.overrides)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
