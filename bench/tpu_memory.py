"""llama1b's train step memory on TPU slices, compiled ahead of time on this host.

For each target (default v6e-8, v5e-8, v5p-8), `+experiment=llama1b mesh=fsdp` is compiled
at 1, 2, 4 and 8 sequences per device (2048 tokens each) and the table of docs/performance.md
printed: temp and total per device and whether it fits the chip's HBM. Then the largest
per-device batch that fits (the search of `run.fit=max_batch`, reusing the compiles above),
next to a full-HBM estimate made without compiling:

    state      = parameters x (4 + 4 + 4) bytes / devices   (float32 weights, Adam's mu, nu)
    gradients  = parameters x 4 bytes / devices              (float32, reduce-scattered)
    weights    = 2 x one layer's parameters x 2 bytes        (bfloat16, gathered, prefetched)
    per row    = length x (layers x emb x 2          (the scan's saved layer inputs)
                 + (8 x emb + 4 x mlp) x 2          (one layer's recomputed activations)
                 ) + chunk x vocab x 10              (a loss chunk's logits: bf16, f32, grad)
    estimate   = (HBM - state - gradients - weights) // per row

    python bench/tpu_memory.py [--targets tpu:v6e-8 tpu:v5e-8 tpu:v5p-8] [--batches 1 2 4 8]
        [--no-search] [--json] [extra overrides, e.g. run.loss_chunk=0]

Needs libtpu (`pip install -e '.[tpu]'`). Each compile takes 30-90 s on two cores.
"""

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from nnxtrain import compose
from nnxtrain.config import Config
from nnxtrain.parallel.distributed import start_jax
from nnxtrain.parallel.target import parse_target
from nnxtrain.train.fit import compiled_for
from nnxtrain.train.max_batch import Probe, compile_probe, search
from nnxtrain.units import format_bytes

BASE = ["+experiment=llama1b", "mesh=fsdp", "run.eval_every=0", "callbacks=none"]


def estimate(config: Config, num_params: int, devices: int, hbm: int) -> int:
    """The full-HBM estimate of the module docstring: sequences per device."""
    m, length = config.model, config.run.seq_len
    per_layer = (
        m.emb_dim * (m.num_heads + 2 * m.num_kv_heads) * m.head_dim
        + m.num_heads * m.head_dim * m.emb_dim
        + 3 * m.emb_dim * m.mlp_dim
    )
    fixed = num_params * 16 // devices + 2 * per_layer * 2
    chunk = config.run.loss_chunk or length
    per_row = length * (m.num_layers * m.emb_dim * 2 + (8 * m.emb_dim + 4 * m.mlp_dim) * 2)
    per_row += chunk * m.vocab_size * 10
    return max(0, (hbm - fixed) // per_row)


def count_params(config: Config) -> int:
    m = config.model
    per_layer = (
        m.emb_dim * (m.num_heads + 2 * m.num_kv_heads) * m.head_dim
        + m.num_heads * m.head_dim * m.emb_dim
        + 3 * m.emb_dim * m.mlp_dim
        + 2 * m.emb_dim
    )
    head = 0 if m.tie_embeddings else m.emb_dim * m.vocab_size
    return m.vocab_size * m.emb_dim + head + m.num_layers * per_layer + m.emb_dim


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", nargs="+", default=["tpu:v6e-8", "tpu:v5e-8", "tpu:v5p-8"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--no-search", action="store_true", help="skip the largest-batch search")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("overrides", nargs="*", help="extra config overrides")
    args = parser.parse_args()
    search_too = not args.no_search
    report = [measure(name, args.batches, search_too, args.overrides) for name in args.targets]
    for entry in report:
        if not args.json:
            print_entry(entry)
    if args.json:
        print(json.dumps(report))


def measure(name: str, batches: list[int], find_largest: bool, overrides: list[str]) -> dict:
    """One target's rows, largest batch and estimate (printed as it goes)."""
    config = compose([*BASE, f"mesh.target={name}", "run.dry_run=true", *overrides])
    start_jax(config)
    config, devices = compiled_for(config, None)
    assert devices is not None
    target, remat = parse_target(name), config.model.remat
    memo: dict[int, Probe] = {}

    def probe(policy: str, batch: int) -> Probe:
        if batch not in memo:
            memo[batch] = compile_probe(config, devices, target, False, policy, batch)
        return memo[batch]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=2) as pool:
        rows = list(pool.map(lambda b: probe(remat, b), batches))
    largest = None
    if find_largest:
        largest = max((p.batch for p in search(probe, [remat], 2) if p.fits), default=0)
    entry = {
        "target": name,
        "device_kind": devices[0].device_kind,
        "hbm_bytes": target.hbm_bytes,
        "remat": remat,
        "loss_chunk": config.run.loss_chunk,
        "rows": [
            {"batch": p.batch, "temp": p.temp, "total": p.total, "fits": p.fits} for p in rows
        ],
        "largest": largest,
        "estimate": estimate(config, count_params(config), len(devices), target.hbm_bytes),
        "probes": len(memo),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(entry), file=sys.stderr, flush=True)  # progress: a target at a time
    return entry


def print_entry(e: dict[str, Any]) -> None:
    print(
        f"{e['target']} ({e['device_kind']}, {format_bytes(e['hbm_bytes'])} HBM), "
        f"llama1b, remat {e['remat']}, loss_chunk {e['loss_chunk']}:"
    )
    for r in e["rows"]:
        temp = format_bytes(r["temp"]) if r["temp"] is not None else "-"
        total = format_bytes(r["total"]) if r["total"] is not None else "refused by XLA"
        print(f"  batch {r['batch']:>3}: temp {temp:>12}, total {total:>14}, fits {r['fits']}")
    if e["largest"] is not None:
        print(f"  largest batch that fits: {e['largest']} per device; estimate {e['estimate']}")
    print(f"  {e['probes']} compiles in {e['seconds']} s")


if __name__ == "__main__":
    main()
