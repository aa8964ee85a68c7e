"""The spike guard's cost, measured two ways in one process, interleaved:

1. the compiled train step with the guard's select (`guard` input) against the same step
   built without it (`guard=None`: no select in the program), same state and batch;
2. the whole run (Trainer.fit, loop seconds per step) with the `spike_guard` plugin
   against the same run without it.

Each prints the medians over `--reps` repetitions and their ratio; the target (issue 16)
is guarded / unguarded <= 1.02.

    python bench/spike_guard.py [--steps 40] [--reps 5] [overrides ...]
"""

import argparse
import io
import statistics
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from nnxtrain.plugins.spike_guard import SpikeGuard
from rich.console import Console

from nnxtrain import Trainer, compose
from nnxtrain.data import build_dataset
from nnxtrain.model import Transformer
from nnxtrain.train.step import TrainState, make_optimizer, make_train_step


def step_seconds(fn: Any, state: Any, batch: Any, guard: Any, steps: int) -> tuple[float, Any]:
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = fn(state, batch, guard) if guard is not None else fn(state, batch)
    jax.block_until_ready(metrics)
    return (time.perf_counter() - t0) / steps, state


def compiled_step(cfg: Any, steps: int, reps: int) -> tuple[float, float]:
    graphdef, params = nnx.split(Transformer(cfg.model, rngs=nnx.Rngs(0)))
    tx, schedule = make_optimizer(cfg.optim, cfg.run.steps)
    make = make_train_step(graphdef, tx, schedule, cfg.optim.z_loss, cfg.run.grad_accum)
    plain = jax.jit(lambda s, b: make(s, b), donate_argnums=0)
    guarded = jax.jit(make, donate_argnums=0)
    host = build_dataset(cfg).batch(0, cfg.run.batch_size, cfg.run.seq_len)
    batch = {k: jnp.asarray(v) for k, v in host.items() if k in ("inputs", "targets", "weights")}
    guard = jnp.asarray([1.0, 1e9, 1e9], jnp.float32)  # on, never triggered
    # Each its own copy: the steps donate their state.
    states = {
        name: jax.tree.map(jnp.copy, TrainState(jnp.zeros((), jnp.int32), params, tx.init(params)))
        for name in ("plain", "guarded")
    }
    times: dict[str, list[float]] = {"plain": [], "guarded": []}
    for rep in range(reps + 1):  # the first repetition compiles and warms up
        for name, fn, g in (("plain", plain, None), ("guarded", guarded, guard)):
            seconds, states[name] = step_seconds(fn, states[name], batch, g, steps)
            if rep:
                times[name].append(seconds)
    return statistics.median(times["plain"]), statistics.median(times["guarded"])


def whole_run(overrides: list[str], reps: int) -> tuple[float, float]:
    times: dict[str, list[float]] = {"plain": [], "guarded": []}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(reps + 1):
            for name in ("plain", "guarded"):
                cfg = compose([*overrides, "callbacks=none", f"run.dir={tmp}/{name}{rep}"])
                callbacks = [SpikeGuard()] if name == "guarded" else []
                console = Console(file=io.StringIO())
                result = Trainer(cfg, callbacks, console=console).fit()
                if rep:
                    times[name].append(result.seconds / result.step)
    return statistics.median(times["plain"]), statistics.median(times["guarded"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. model=tiny")
    args = ap.parse_args()
    overrides = [*args.overrides, f"run.steps={args.steps}", "run.eval_every=0"]
    cfg = compose(overrides)
    print(
        f"model {cfg.model.name}, batch {cfg.run.batch_size} x {cfg.run.seq_len}, "
        f"{jax.device_count()} {jax.default_backend()} device(s), {args.reps} reps x "
        f"{args.steps} steps"
    )
    print(f"{'what':>14} {'unguarded ms':>12} {'guarded ms':>11} {'ratio':>7}")
    p, g = compiled_step(cfg, args.steps, args.reps)
    print(f"{'compiled step':>14} {p * 1e3:12.2f} {g * 1e3:11.2f} {g / p:7.3f}")
    p, g = whole_run(overrides, args.reps)
    print(f"{'whole run':>14} {p * 1e3:12.2f} {g * 1e3:11.2f} {g / p:7.3f}")


if __name__ == "__main__":
    main()
