"""LoRA against a full fine-tune, in one run: the compiled train step's memory per device
for llama1b (dry runs: compiled, nothing allocated), and steps/s on a small model on CPU.

Memory, llama1b (`+experiment=llama1b`, 2048 tokens a sequence, remat as configured), each
compiled for the same devices: a full fine-tune; LoRA r=16 on every linear projection with
a float32 base; the same with a bfloat16 base (`model.lora.base_dtype=bfloat16`). Goals
(issue 25): total <= 0.40x full with the float32 base, <= 0.25x with the bfloat16 one.
With `--target tpu:v5e-8` (needs libtpu: `pip install -e '.[tpu]'`) it compiles for that
TPU slice instead of this host's devices.

Speed: model=small on this host's CPU devices, `--steps` steps each (the first, which
compiles, left out of the rate), full and LoRA r=16 all-linear. Goal: >= 1.2x.

    python bench/lora.py [--target tpu:v5e-8] [--steps 60] [--skip-memory] [--skip-speed]
        [extra overrides of the memory runs, e.g. model.scan_layers=true]
"""

import argparse
import json
import tempfile

from nnxtrain import Trainer, compose
from nnxtrain.train.compile import CompiledMemory
from nnxtrain.units import format_bytes

LORA = ["model.lora.rank=16", "model.lora.alpha=32", "model.lora.targets=all-linear"]
VARIANTS = {
    "full": [],
    "lora_f32_base": LORA,
    "lora_bf16_base": [*LORA, "model.lora.base_dtype=bfloat16"],
}


def memory(target: str, batch: int, overrides: list[str]) -> dict[str, dict[str, int]]:
    """Each variant's compiled train-step memory per device (llama1b, dry run)."""
    out = {}
    for name, extra in VARIANTS.items():
        args = ["+experiment=llama1b", "run.dry_run=true", "run.eval_every=0", "callbacks=none"]
        args += [f"run.batch_size={batch}", f"run.dir={tempfile.mkdtemp()}", *extra, *overrides]
        if target:
            args.append(f"mesh.target={target}")
        trainer = Trainer(compose(args))
        trainer.fit()
        out[name] = CompiledMemory.of(trainer.compiled).as_dict()
        print(json.dumps({name: out[name]}), flush=True)
    return out


def speed(steps: int) -> dict[str, float]:
    """Steps per second of model=small on CPU, full and LoRA, the compile step left out."""
    out = {}
    for name in ("full", "lora_f32_base"):
        args = ["model=small", f"run.steps={steps}", "run.eval_every=0", "callbacks=none"]
        args += [f"run.dir={tempfile.mkdtemp()}", "run.log_every=1000", *VARIANTS[name]]
        result = Trainer(compose(args)).fit()
        tokens_per_step = result.timed_tokens / max(result.step - 1, 1)
        out[name] = result.timed_tokens / result.timed_seconds / tokens_per_step
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="", help="compile for this mesh.target (TPU)")
    parser.add_argument("--batch", type=int, default=-1, help="run.batch_size (-1: 1/device)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("overrides", nargs="*", help="extra overrides of the memory runs")
    args = parser.parse_args()
    report: dict = {}
    if not args.skip_memory:
        mem = report["memory"] = memory(args.target, args.batch, args.overrides)
        full = mem["full"]["total"]
        for name, m in mem.items():
            ratio = m["total"] / full
            where = args.target or "this host"
            print(
                f"llama1b {where}: {name:>15}: total {format_bytes(m['total'])} per device "
                f"({ratio:.3f}x full), argument {format_bytes(m['argument'])}, "
                f"temp {format_bytes(m['temp'])}"
            )
    if not args.skip_speed:
        rate = report["speed"] = speed(args.steps)
        print(
            f"model=small on CPU: full {rate['full']:.2f} steps/s, LoRA r=16 "
            f"{rate['lora_f32_base']:.2f} steps/s ({rate['lora_f32_base'] / rate['full']:.2f}x)"
        )
    print(json.dumps(report))


if __name__ == "__main__":
    main()
