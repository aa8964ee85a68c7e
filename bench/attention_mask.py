"""Document masking's cost: a train step (forward and backward) with segment ids against the
same step without them, same model, same shapes, in one process.

For each attention kernel (`matmul`, `xla`), both steps are compiled once, then timed in
interleaved repetitions (plain, masked, plain, masked, ...), each over `--steps` calls
from the first dispatch to the last completion; the medians and their ratio are printed.
The masked rows hold documents with log-normal lengths (median seq_len / 4), as packed
data would. The bar (issue 15): masked / plain <= 1.10 on CPU.

    python bench/attention_mask.py [--steps 20] [--reps 5] [overrides ...]
"""

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nnxtrain import compose
from nnxtrain.model import Transformer
from nnxtrain.train.step import loss_sums


def packed_segments(rng: np.random.Generator, batch: int, length: int) -> np.ndarray:
    """Segment ids [batch, length]: rows cut into documents of log-normal lengths."""
    seg = np.zeros((batch, length), np.int32)
    for row in seg:
        start, doc = 0, 1
        while start < length:
            n = max(2, int(rng.lognormal(np.log(length / 4), 0.8)))
            row[start : start + n] = doc
            start, doc = start + n, doc + 1
    return seg


def step_fn(graphdef: nnx.GraphDef, masked: bool) -> Callable[..., Any]:
    """A jitted forward + backward of the mean loss (what a train step computes)."""

    def loss(params: nnx.State, batch: dict[str, jax.Array]) -> jax.Array:
        model = nnx.merge(graphdef, params)
        seg = batch["segment_ids"] if masked else None
        logits = model(batch["inputs"], None, seg)
        sums = loss_sums(logits, batch["targets"], jnp.ones(batch["targets"].shape), 0.0)
        return sums["ce"] / sums["weight"]

    return jax.jit(jax.value_and_grad(loss))


def seconds_per_step(fn: Callable[..., Any], params: nnx.State, batch: dict, steps: int) -> float:
    start = time.perf_counter()
    out = None
    for _ in range(steps):
        out = fn(params, batch)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. run.seq_len=512")
    args = ap.parse_args()
    cfg = compose(args.overrides)
    b, length = cfg.run.batch_size, cfg.run.seq_len
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.model.vocab_size, (b, length + 1)).astype(np.int32)
    batch = {
        "inputs": jnp.asarray(tokens[:, :-1]),
        "targets": jnp.asarray(tokens[:, 1:]),
        "segment_ids": jnp.asarray(packed_segments(rng, b, length)),
    }
    docs = len({(r, s) for r, row in enumerate(np.asarray(batch["segment_ids"])) for s in row})
    print(
        f"model {cfg.model.name}, batch {b} x {length}, {docs / b:.1f} documents per row, "
        f"{jax.device_count()} {jax.default_backend()} device(s); {args.reps} reps x "
        f"{args.steps} steps"
    )
    print(f"{'kernel':>7} {'plain ms':>9} {'masked ms':>9} {'masked/plain':>12}")
    for kernel in ("matmul", "xla"):
        model_cfg = dataclasses.replace(cfg.model, attention=kernel)
        graphdef, params = nnx.split(Transformer(model_cfg, rngs=nnx.Rngs(0)))
        plain, masked = step_fn(graphdef, False), step_fn(graphdef, True)
        for fn in (plain, masked):  # compile and warm up outside the timing
            jax.block_until_ready(fn(params, batch))
        times: dict[str, list[float]] = {"plain": [], "masked": []}
        for _ in range(args.reps):
            times["plain"].append(seconds_per_step(plain, params, batch, args.steps))
            times["masked"].append(seconds_per_step(masked, params, batch, args.steps))
        p, m = (statistics.median(times[k]) * 1e3 for k in ("plain", "masked"))
        print(f"{kernel:>7} {p:9.2f} {m:9.2f} {m / p:12.3f}")


if __name__ == "__main__":
    main()
