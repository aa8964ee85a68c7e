"""DPO against SFT on the same model and rows, in one run: steps/s and the compiled train
step's memory per device.

SFT trains on 2B rows of `--seq` tokens (synthetic data, the byte tokenizer's vocabulary);
DPO on B pairs, which are the same 2B rows (prompt + reply, every row full), with the
reference held beside the state (`dpo.reference=init`: one more forward of the 2B rows,
its parameters an argument of the step) and precomputed (`dpo.precompute_ref=true`: no
reference in the step, one log-prob per row in the batch). Goals (issue 27): DPO <= 2.2x
SFT's step time with the held reference, <= 1.1x its memory with the precomputed one.

    python bench/dpo.py [--model small] [--pairs 8] [--seq 128] [--steps 40]
        [extra overrides of every run, e.g. model.remat=full]
"""

import argparse
import json
import os
import tempfile

import numpy as np

from nnxtrain import Trainer, compose
from nnxtrain.train.compile import CompiledMemory
from nnxtrain.units import format_bytes

VOCAB = 257  # the byte tokenizer's: 256 bytes + end-of-sequence


def pairs_file(directory: str, pairs: int, seq: int) -> str:
    """`pairs` random byte pairs whose prompt + reply + EOS fill seq + 1 tokens exactly."""
    rng = np.random.default_rng(0)
    path = os.path.join(directory, "pairs.jsonl")

    def text(n: int) -> str:
        return "".join(chr(c) for c in rng.integers(ord("a"), ord("z") + 1, n))

    with open(path, "w") as f:
        for _ in range(pairs):
            prompt = text(seq // 2)
            reply = seq + 1 - len(prompt) - 1  # the EOS ends the reply
            row = {"prompt": prompt, "chosen": text(reply), "rejected": text(reply)}
            f.write(json.dumps(row) + "\n")
    return path


def run(args: list[str], steps: int) -> dict[str, float]:
    cfg = compose([f"run.steps={steps}", "run.eval_every=0", "callbacks=none", *args])
    trainer = Trainer(cfg)
    result = trainer.fit()
    memory = CompiledMemory.of(trainer.compiled).as_dict()
    # timed over every step but the first (compile, and DPO's reference build or pass)
    steps_per_s = (result.step - 1) / result.timed_seconds if result.timed_seconds else 0.0
    return {"steps_per_s": steps_per_s, **{f"memory_{k}": v for k, v in memory.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small")
    parser.add_argument("--pairs", type=int, default=8, help="B: DPO pairs, SFT rows / 2")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("overrides", nargs="*", help="extra overrides of every run")
    a = parser.parse_args()
    tmp = tempfile.mkdtemp()
    data = pairs_file(tmp, 4 * a.pairs, a.seq)
    common = [f"model={a.model}", f"run.seq_len={a.seq}", "run.log_every=1000", *a.overrides]
    dpo = ["+experiment=dpo", f"data.path={data}", f"run.batch_size={a.pairs}"]
    variants = {
        "sft": [f"run.batch_size={2 * a.pairs}", f"model.vocab_size={VOCAB}"],
        "dpo_held": dpo,
        "dpo_precomputed": [*dpo, "dpo.precompute_ref=true"],
    }
    report = {}
    for name, extra in variants.items():
        report[name] = run([*common, *extra, f"run.dir={tmp}/{name}"], a.steps)
        print(json.dumps({name: report[name]}), flush=True)
    sft = report["sft"]
    for name in ("dpo_held", "dpo_precomputed"):
        r = report[name]
        time_ratio = sft["steps_per_s"] / r["steps_per_s"]
        mem_ratio = r["memory_total"] / sft["memory_total"]
        report[name] |= {"step_time_vs_sft": time_ratio, "memory_vs_sft": mem_ratio}
        print(
            f"{a.model}, {a.pairs} pairs x {a.seq}: {name}: {r['steps_per_s']:.2f} steps/s "
            f"(step time {time_ratio:.2f}x SFT's {sft['steps_per_s']:.2f}), memory "
            f"{format_bytes(r['memory_total'])} ({mem_ratio:.3f}x SFT's "
            f"{format_bytes(sft['memory_total'])})"
        )
    print(json.dumps(report))


if __name__ == "__main__":
    main()
