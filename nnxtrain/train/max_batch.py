"""The largest batch that fits: `run.fit=max_batch` compiles the train step for mesh.target
at growing per-device batches, for each remat policy asked, and finds the largest that
fits one device's HBM.

    nnxtrain +experiment=llama1b mesh=fsdp mesh.target=tpu:v6e-8 run.fit=max_batch \\
        run.fit_remat=[full,dots]

The batch searched is per data-parallel device (data x fsdp) and per micro-batch: the
global batch of a probe is batch x data x fsdp x run.grad_accum. Per policy the search
doubles the batch from 1 until one does not fit, then narrows the gap between the last
that fit and the first that did not until they are neighbours. A probe that XLA refuses
to compile (RESOURCE_EXHAUSTED, as on hardware) does not fit. Each round compiles up to
`workers` probes side by side, one thread each: XLA's compile releases the GIL, and the
sharding rules are per thread (`use_rules`), so tracing two probes at once is safe. Every
compiled program lands in the persistent compilation cache (run.compile_cache): the same
search again loads them.
"""

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import jax
from rich.console import Console

from nnxtrain.config import Config, fit_remats
from nnxtrain.data import build_dataset, resolve_vocab
from nnxtrain.jsonio import write_json
from nnxtrain.model import Transformer, trainable
from nnxtrain.parallel.distributed import start_jax
from nnxtrain.parallel.mesh import batch_sharding, build_mesh, data_parallel_size
from nnxtrain.parallel.sharding import merge_rules
from nnxtrain.parallel.target import Target, parse_target
from nnxtrain.train.compile import OutOfMemory, compile_steps, plan_state
from nnxtrain.train.feed import BATCH_DTYPES, DOCUMENT_DTYPES
from nnxtrain.train.fit import compiled_for
from nnxtrain.train.step import make_optimizer
from nnxtrain.units import format_bytes

# No per-device batch above this is tried: a search that still fits there stops and says so.
LIMIT = 4096


@dataclass(frozen=True)
class Probe:
    """One compile of the train step: a remat policy at a per-device batch."""

    remat: str
    batch: int  # sequences per data-parallel device and micro-batch
    total: int | None  # bytes per device (argument + output - alias + temp); None: refused
    temp: int | None
    fits: bool
    seconds: float  # wall time of its lower and compile


@dataclass(frozen=True)
class Search:
    """The probes of a search and what they say."""

    target: Target
    seq_len: int
    data_parallel: int  # devices the batch is split over (data x fsdp)
    grad_accum: int
    probes: tuple[Probe, ...]

    def largest(self, remat: str) -> int:
        """The largest per-device batch that fits under `remat` (0: not even one)."""
        return max((p.batch for p in self.probes if p.remat == remat and p.fits), default=0)

    def remats(self) -> list[str]:
        return list(dict.fromkeys(p.remat for p in self.probes))

    def table(self) -> str:
        """Batch x remat -> total per device and fits, then the largest batch per policy."""
        t = self.target
        lines = [
            f"max batch on {t.name} ({t.num_devices} devices, {format_bytes(t.hbm_bytes)} HBM "
            f"each), {self.seq_len} tokens per sequence; per device:",
            f"  {'remat':<14} {'batch':>6} {'temp':>12} {'total':>12}  fits  compile",
        ]
        for p in sorted(self.probes, key=lambda p: (self.remats().index(p.remat), p.batch)):
            temp = format_bytes(p.temp) if p.temp is not None else "-"
            total = format_bytes(p.total) if p.total is not None else "refused by XLA"
            fits = "yes" if p.fits else "no"
            lines.append(
                f"  {p.remat:<14} {p.batch:>6} {temp:>12} {total:>12}  {fits:<4}  {p.seconds:.1f} s"
            )
        for remat in self.remats():
            best = self.largest(remat)
            per_step = best * self.data_parallel * self.grad_accum
            capped = " (the search's limit: more may fit)" if best >= LIMIT else ""
            lines.append(
                f"largest batch with remat={remat}: {best} per device"
                + (f" (run.batch_size={per_step}){capped}" if best else ": none fits")
            )
        return "\n".join(lines)

    def record(self) -> dict[str, Any]:
        """max_batch.json: the target, every probe, the largest batch per policy."""
        return {
            "target": self.target.name,
            "hbm_bytes": self.target.hbm_bytes,
            "seq_len": self.seq_len,
            "data_parallel": self.data_parallel,
            "grad_accum": self.grad_accum,
            "probes": [dataclasses.asdict(p) for p in self.probes],
            "largest": {remat: self.largest(remat) for remat in self.remats()},
        }


def next_batches(fits: dict[int, bool], workers: int) -> list[int]:
    """The next `workers` batches to try, given the verdicts so far: powers of two above
    the largest that fit until one does not, then points evenly inside the gap between the
    largest that fit and the smallest that did not. Empty when that gap is closed."""
    lo = max((b for b, ok in fits.items() if ok), default=0)
    hi = min((b for b, ok in fits.items() if not ok), default=None)
    if hi is None:
        start = lo * 2 if lo else 1
        batches = [start * 2**i for i in range(workers)]
        return [b for b in batches if b <= LIMIT and b not in fits]
    if hi <= lo:  # a smaller batch failed where a larger one fit: nothing to narrow
        return []
    step = (hi - lo) / (workers + 1)
    return sorted({lo + max(1, round(step * i)) for i in range(1, workers + 1)} - {hi} - set(fits))


def search(probe: Callable[[str, int], Probe], remats: Sequence[str], workers: int) -> list[Probe]:
    """Every probe the search makes, policy by policy, up to `workers` at once."""
    probes: list[Probe] = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for remat in remats:
            fits: dict[int, bool] = {}
            while batches := next_batches(fits, workers):
                for p in pool.map(lambda b, r=remat: probe(r, b), batches):
                    probes.append(p)
                    fits[p.batch] = p.fits
    return probes


def compile_probe(
    config: Config,
    devices: Sequence[jax.Device],
    target: Target,
    document_mask: bool,
    remat: str,
    batch: int,
) -> Probe:
    """Compiles the train step at per-device `batch` under `remat`; whether it fits."""
    t0 = time.perf_counter()
    mesh = build_mesh(config.mesh, devices)
    dp = data_parallel_size(mesh)
    run = dataclasses.replace(config.run, batch_size=batch * dp * config.run.grad_accum)
    cfg = dataclasses.replace(config, model=dataclasses.replace(config.model, remat=remat), run=run)
    rules = merge_rules(cfg.mesh.rules)
    tx, schedule = make_optimizer(cfg.optim, cfg.run.steps)
    factory = lambda rngs: Transformer(cfg.model, rngs=rngs)  # noqa: E731
    plan = plan_state(factory, tx, run.seed, mesh, rules, trainable(cfg.model))
    dtypes = {**BATCH_DTYPES, **(DOCUMENT_DTYPES if document_mask else {})}
    spec = {
        k: jax.ShapeDtypeStruct((run.batch_size, run.seq_len), d, sharding=batch_sharding(mesh))
        for k, d in dtypes.items()
    }
    try:
        train, _ = compile_steps(
            plan,
            mesh,
            rules,
            spec,
            tx=tx,
            schedule=schedule,
            z_loss=cfg.optim.z_loss,
            grad_accum=run.grad_accum,
            loss_chunk=run.loss_chunk,
            with_eval=False,
        )
    except OutOfMemory:
        return Probe(remat, batch, None, None, False, time.perf_counter() - t0)
    memory = train.memory
    fits = memory.total <= target.hbm_bytes
    return Probe(remat, batch, memory.total, memory.temp, fits, time.perf_counter() - t0)


def max_batch(
    config: Config,
    devices: Sequence[jax.Device],
    *,
    document_mask: bool = False,
    workers: int | None = None,
) -> Search:
    """The search of run.fit=max_batch for `config` (mesh.target's `devices`, `auto`
    settled: `fit.compiled_for`); `workers` compiles at once (default: 2, or 1 on a
    1-core host)."""
    target = parse_target(config.mesh.target)
    workers = workers or max(1, min(2, os.cpu_count() or 1))

    def probe(remat: str, batch: int) -> Probe:
        return compile_probe(config, devices, target, document_mask, remat, batch)

    dp = data_parallel_size(build_mesh(config.mesh, devices))
    probes = search(probe, fit_remats(config), workers)
    return Search(target, config.run.seq_len, dp, config.run.grad_accum, tuple(probes))


def run_max_batch(config: Config, console: Console | None = None) -> Search:
    """run.fit=max_batch as the CLI runs it: the search for mesh.target, its table printed,
    its record kept in run.dir/max_batch.json (when run.dir is set)."""
    console = console or Console(soft_wrap=True)
    start_jax(config)  # the compilation cache, before anything compiles
    config, devices = compiled_for(config, None)
    assert devices is not None  # run.fit requires mesh.target (config checks)
    dataset = build_dataset(config)
    config = resolve_vocab(config, dataset)
    remats = ", ".join(fit_remats(config))
    console.print(
        f"searching the largest batch for {config.mesh.target} ({config.model.name}, "
        f"{config.model.dtype} activations, remat {remats}); each probe compiles the train step"
    )
    result = max_batch(config, devices, document_mask=getattr(dataset, "document_mask", False))
    console.print(result.table(), markup=False, highlight=False)
    if config.run.dir:
        os.makedirs(config.run.dir, exist_ok=True)
        path = os.path.join(config.run.dir, "max_batch.json")
        write_json(path, result.record())
        console.print(f"kept in {path}", markup=False, highlight=False)
    return result
