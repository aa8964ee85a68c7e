"""Does the data loader keep up? Loader batches/s against Trainer steps/s, side by side.

Uses tinyshakespeare from ../shared/data when present (else a generated 1 MB corpus),
`data=text` with the byte and char tokenizers, and the default small model. Measures, in
one process:

- loader: `dataset.batch(step, ...)` called back to back for `--batches` steps, with the
  default prefetch thread and without (`data.prefetch=0`): host batches per second;
- trainer: `Trainer.fit()` on the same data for `--steps` steps (loop time from the first
  dispatch to the last completion; compilation excluded): steps per second.

Prints both and their ratio (loader/trainer); a ratio well above 1 means the loader
never starves the step (the trainer also overlaps each batch with the running step).

    python bench/loader.py [--steps 60] [--batches 2000] [overrides ...]
"""

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from nnxtrain import Callback, Trainer, compose
from nnxtrain.data import build_dataset

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def corpus(tmp: str) -> tuple[str, str]:
    """tinyshakespeare if present, else a generated corpus of about 1 MB."""
    if SHARED.is_file():
        return str(SHARED), "tinyshakespeare"
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("etaoinshrdlu"), size=rng.integers(2, 9))) for _ in range(500)]
    lines = [" ".join(rng.choice(words, size=12)) + "\n" for _ in range(14000)]
    path = Path(tmp) / "generated.txt"
    path.write_text("".join(lines), encoding="utf-8")
    return str(path), "generated corpus"


def loader_rate(cfg: Any, batches: int) -> float:
    """Host batches per second of dataset.batch(step) called back to back."""
    data = build_dataset(cfg)
    b, s = cfg.run.batch_size, cfg.run.seq_len
    data.batch(0, b, s)
    t0 = time.perf_counter()
    for step in range(1, batches + 1):
        data.batch(step, b, s)
    rate = batches / (time.perf_counter() - t0)
    if hasattr(data, "close"):
        data.close()
    return rate


class _LoopClock(Callback):
    """Times the loop from the first dispatch to the last completion."""

    def on_train_start(self, trainer: Any, event: Any) -> None:
        self.t0 = time.perf_counter()

    def on_train_end(self, trainer: Any, event: Any) -> None:
        self.seconds = time.perf_counter() - self.t0


def trainer_rate(cfg: Any, steps: int) -> float:
    clock = _LoopClock()
    Trainer(cfg, [clock]).fit()
    return steps / clock.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batches", type=int, default=2000)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path, name = corpus(tmp)
        for tokenizer in ("byte", "char"):
            base = [
                "data=text",
                f"data.path={path}",
                f"data.tokenizer={tokenizer}",
                "callbacks=none",
                "run.eval_every=0",
                f"run.steps={args.steps}",
                *args.overrides,
            ]
            cfg = compose([*base, f"run.dir={tmp}/{tokenizer}"])
            t0 = time.perf_counter()
            build_dataset(compose([*base, "data.prefetch=0"]))
            build_s = time.perf_counter() - t0
            prefetch = loader_rate(cfg, args.batches)
            plain = loader_rate(compose([*base, "data.prefetch=0"]), args.batches)
            steps = trainer_rate(cfg, args.steps)
            rows.append((tokenizer, build_s, prefetch, plain, steps))
    print(
        f"\n{name}: model {cfg.model.name}, batch {cfg.run.batch_size} x {cfg.run.seq_len}, "
        f"{args.steps} train steps, {args.batches} loader batches, backend "
        f"{jax.default_backend()}"
    )
    print(
        f"{'tokenizer':9s} {'tokenize s':>10s} {'loader b/s':>11s} {'no-prefetch':>11s} "
        f"{'train st/s':>10s} {'loader/train':>12s}"
    )
    for tok, build_s, pre, plain, steps in rows:
        ratio = min(pre, plain) / steps
        print(f"{tok:9s} {build_s:10.2f} {pre:11.1f} {plain:11.1f} {steps:10.2f} {ratio:12.1f}")
    print("loader/train uses the slower loader column; > 1 means the step never waits on data")


if __name__ == "__main__":
    main()
