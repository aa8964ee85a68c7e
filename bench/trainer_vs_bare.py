"""Trainer overhead: the Trainer (default plugins on) against a bare hand-written jitted loop.

Both train the same model on the same batches with the same optimizer, on the same devices,
mesh and shardings (the bare loop lays its arrays out with nnxtrain's mesh and sharding
helpers, as a hand-written sharded loop would), in one process, interleaved (bare, trainer,
bare, trainer, ...), and each repetition's time per step is measured from the first
dispatch to the last completion. Prints both medians and their ratio; the target is
trainer/bare <= 1.03.

    python bench/trainer_vs_bare.py [--steps 60] [--reps 3] [overrides ...]
"""

import argparse
import statistics
import tempfile
import time
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx

from nnxtrain import Callback, Trainer, compose
from nnxtrain.data import build_dataset
from nnxtrain.model import Transformer
from nnxtrain.parallel.distributed import start_jax
from nnxtrain.parallel.mesh import batch_sharding, build_mesh
from nnxtrain.parallel.sharding import merge_rules, state_shardings, use_rules
from nnxtrain.train.step import make_optimizer


def bare_loop(cfg: Any, steps: int) -> float:
    """Seconds per step of the simplest correct loop: jit, donate, no callbacks."""
    data = build_dataset(cfg)
    mesh, rules = build_mesh(cfg.mesh), merge_rules(cfg.mesh.rules)
    graphdef, params = nnx.split(Transformer(cfg.model, rngs=nnx.Rngs(cfg.run.seed)))
    tx, _ = make_optimizer(cfg.optim, cfg.run.steps)
    state = (params, tx.init(params))
    shardings = state_shardings(state, mesh, rules)
    params, opt_state = jax.device_put(state, shardings)
    on_mesh = batch_sharding(mesh)

    def step(params: Any, opt_state: Any, batch: dict[str, Any]) -> Any:
        def loss_fn(p: Any) -> jax.Array:
            logits = nnx.merge(graphdef, p)(batch["inputs"]).astype(np.float32)
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    batch = jax.device_put(data.batch(0, cfg.run.batch_size, cfg.run.seq_len), on_mesh)
    # Compiled ahead of time, like the Trainer's step: both timings start at the first
    # dispatch and include the first execution.
    with use_rules(mesh, rules):  # the model's activation constraints, as in the Trainer
        jitted = jax.jit(
            step,
            in_shardings=(*shardings, on_mesh),
            out_shardings=(*shardings, None),
            donate_argnums=(0, 1),
        )
        jstep = jitted.lower(params, opt_state, batch).compile()
    t0 = time.perf_counter()
    for i in range(steps):
        batch = jax.device_put(data.batch(i, cfg.run.batch_size, cfg.run.seq_len), on_mesh)
        params, opt_state, loss = jstep(params, opt_state, batch)
    jax.block_until_ready(loss)
    return (time.perf_counter() - t0) / steps


class _LoopClock(Callback):
    """Times the trainer's loop from on_train_start to the last step's completion."""

    def on_train_start(self, trainer: Any, event: Any) -> None:
        self.t0 = time.perf_counter()

    def on_train_end(self, trainer: Any, event: Any) -> None:
        self.seconds = time.perf_counter() - self.t0


def trainer_loop(overrides: list[str], steps: int, run_dir: str) -> float:
    """Seconds per step of Trainer.fit() with the config's plugins plus a loop clock."""
    cfg = compose([*overrides, f"run.steps={steps}", f"run.dir={run_dir}", "run.eval_every=0"])
    from nnxtrain.train.registry import build_callbacks

    clock = _LoopClock()
    # The clock comes first so that it stops at the last step's completion, before the other
    # plugins' end-of-run work (the checkpointer's final save is not a per-step cost).
    trainer = Trainer(cfg, [clock, *build_callbacks(cfg.callbacks)])
    trainer.fit()
    return clock.seconds / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = compose([*args.overrides, f"run.steps={args.steps}"])
    start_jax(cfg)  # the devices a run of this config gets (run.host_devices)
    bare, trainer = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):
            bare.append(bare_loop(cfg, args.steps))
            trainer.append(trainer_loop(args.overrides, args.steps, f"{tmp}/rep{rep}"))
    b, t = statistics.median(bare), statistics.median(trainer)
    print(
        f"\nmodel {cfg.model.name}, batch {cfg.run.batch_size} x {cfg.run.seq_len}, "
        f"{args.steps} steps x {args.reps} reps, backend {jax.default_backend()}, "
        f"{jax.device_count()} device(s)"
    )
    for label, times, median in (("bare jitted loop", bare, b), ("Trainer.fit()", trainer, t)):
        reps = ", ".join(f"{x * 1e3:.1f}" for x in times)
        print(f"{label:17s}: {median * 1e3:8.2f} ms/step  (reps: {reps})")
    print(f"ratio trainer/bare: {t / b:.3f}  (target <= 1.03)")


if __name__ == "__main__":
    main()
