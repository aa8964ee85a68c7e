"""Checkpoint digests: what they cost at save and at restore, against the same without them.

Trains one step of a model (`--model` overrides, default a ~9M-parameter `small`), then,
in one process and interleaved (without, with, without, with, ...), saves its state with
`checkpoint_io.save` and restores it with `checkpoint_io.restore`: "without" replaces the
digests and the sealing of the meta JSON by no-ops, so its restore has nothing to verify:
what the checkpointer did before digests. Prints the medians, the minimums (the least
disturbed by other load) and the ratios with/without of:

- save, loop blocked: `save()` returning (digests + Orbax's copy to the host);
- save, total: until the background write has finished;
- restore: until the arrays are on the device (and, with digests, verified);

plus the digest computation alone (warm; and its first call, which compiles or loads
from the compilation cache).

    python bench/checkpoint_checksums.py [--reps 9] [--model model.emb_dim=384 ...]
"""

import argparse
import contextlib
import io
import statistics
import tempfile
import time
from typing import Any
from unittest import mock

import jax
from rich.console import Console

from nnxtrain import Trainer, compose
from nnxtrain.checkpoint import digest
from nnxtrain.checkpoint import storage as cio

MODEL = ["model.emb_dim=384", "model.num_layers=6", "model.mlp_dim=1152"]


def _zeros(leaves: Any) -> list[list[int]]:
    return [[0, 0] for _ in leaves]


def _unsealed(meta: dict[str, Any], rows: Any) -> dict[str, Any]:
    return meta


def _timed_save(mngr: Any, step: int, state: Any) -> tuple[float, float]:
    t0 = time.perf_counter()
    cio.save(mngr, step, state, {"format": cio.FORMAT, "step": step, "config": {}})
    blocked = time.perf_counter() - t0
    mngr.wait_until_finished()
    return blocked, time.perf_counter() - t0


def _timed_restore(mngr: Any, step: int, abstract: Any) -> float:
    t0 = time.perf_counter()
    state, _, _ = cio.restore(mngr, step, abstract, {}, warn=lambda _: None)
    jax.block_until_ready(state)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--model", nargs="*", default=MODEL)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose([*args.model, "run.steps=1", f"run.dir={tmp}/run", "callbacks=none"])
        trainer = Trainer(cfg, [], console=Console(file=io.StringIO()))
        state = trainer.fit().state
        leaves = cio.leaf_names(state)[1]
        nbytes = sum(x.nbytes for x in leaves)
        t0 = time.perf_counter()
        digest.digests(leaves)
        first = time.perf_counter() - t0
        warm = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            digest.digests(leaves)
            warm.append(time.perf_counter() - t0)
        times: dict[str, dict[str, list[float]]] = {
            mode: {"blocked": [], "total": [], "restore": []} for mode in ("without", "with")
        }
        managers = {mode: cio.open_manager(f"{tmp}/{mode}", keep=1) for mode in times}
        for rep in range(args.reps + 1):  # the first round warms both paths up
            for mode in ("without", "with") if rep % 2 else ("with", "without"):
                with contextlib.ExitStack() as stack:
                    if mode == "without":  # no digests computed, none sealed into meta
                        stack.enter_context(mock.patch.object(digest, "digests", _zeros))
                        stack.enter_context(mock.patch.object(digest, "seal", _unsealed))
                    blocked, total = _timed_save(managers[mode], rep, state)
                restore = _timed_restore(managers[mode], rep, trainer.abstract_state)
                if rep:
                    for key, value in zip(times[mode], (blocked, total, restore), strict=True):
                        times[mode][key].append(value)
        for mngr in managers.values():
            mngr.close()
    print(
        f"\nstate: {len(leaves)} arrays, {nbytes / 2**20:.1f} MiB, {jax.device_count()} "
        f"{jax.default_backend()} device(s); {args.reps} interleaved reps"
    )
    print(
        f"digests alone: {statistics.median(warm) * 1e3:.1f} ms warm "
        f"({nbytes / statistics.median(warm) / 2**30:.2f} GiB/s); first call {first:.2f} s "
        "(compiles, or loads from the compilation cache)"
    )
    for key, label in (
        ("blocked", "save, loop blocked"),
        ("total", "save, total"),
        ("restore", "restore"),
    ):
        for stat in (statistics.median, min):
            a, b = stat(times["without"][key]), stat(times["with"][key])
            print(
                f"{label:19s} {stat.__name__:6s}: without {a * 1e3:7.1f} ms | "
                f"with {b * 1e3:7.1f} ms | ratio {b / a:.3f}"
            )


if __name__ == "__main__":
    main()
