"""Every JSON file and JSON line a run writes is strict JSON: a loss or gradient norm that
is NaN or infinite is written as null, never as the bare `NaN`/`Infinity` that Python's
json writes and that jq and JavaScript's JSON.parse refuse."""

import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from nnxtrain.plugins.memstats import MemStats
from nnxtrain.plugins.metrics_logger import MetricsLogger
from nnxtrain.plugins.spike_guard import SpikeGuard
from rich.console import Console

from nnxtrain import Trainer, compose, json_line
from nnxtrain.data import SyntheticData


def strict_loads(text: str) -> Any:
    """json.loads as a strict parser reads: NaN, Infinity and -Infinity are errors."""

    def refuse(word: str) -> Any:
        raise ValueError(f"{word} is not JSON")

    return json.loads(text, parse_constant=refuse)


class NanWeights(SyntheticData):
    """The synthetic data, with NaN loss weights in the train batches of `steps` (0-based):
    those steps' loss and gradient norm are NaN (and the spike guard skips them)."""

    def __init__(self, *args: Any, steps: tuple[int, ...]):
        super().__init__(*args)
        self.nan_steps = steps

    def batch(self, step: int, batch_size: int, seq_len: int, split: str = "train", rows=None):
        out = super().batch(step, batch_size, seq_len, split, rows)
        if split == "train" and step in self.nan_steps:
            out["weights"] = np.full_like(out["weights"], np.nan)
        return out


def test_every_record_file_of_a_run_with_nan_steps_parses_strictly(tmp_path: Path) -> None:
    args = ["model=tiny", "run.steps=4", "run.batch_size=4", "run.seq_len=16"]
    cfg = compose([*args, "run.eval_every=0", "callbacks=none", f"run.dir={tmp_path}"])
    # Batches 1 and 3 are NaN: steps 2 and 4, the last one too (run_info's final metrics).
    data = NanWeights(
        cfg.model.vocab_size, cfg.data.branching, cfg.data.source_seed, cfg.run.seed, steps=(1, 3)
    )
    callbacks = [
        MetricsLogger(log_every=1, tensorboard=False, progress=False),
        SpikeGuard(warmup=1),
        MemStats(every=1),
    ]
    for cb, name in zip(callbacks, ("metrics", "spike_guard", "memstats"), strict=True):
        cb.name = name
    console = Console(file=io.StringIO(), width=300)
    Trainer(cfg, callbacks, dataset=data, console=console).fit()

    files = sorted(p for p in tmp_path.rglob("*") if p.suffix in (".json", ".jsonl"))
    names = {p.name for p in files}
    assert {"run_info.json", "metrics.jsonl", "skipped_batches.jsonl", "memstats.jsonl"} <= names
    parsed = {}
    for path in files:
        text = path.read_text()
        if path.suffix == ".jsonl":
            parsed[path.name] = [strict_loads(line) for line in text.splitlines()]
        else:
            parsed[path.name] = strict_loads(text)
    # The NaN values are there, as null (not dropped, not turned into numbers).
    losses = {r["step"]: r["loss"] for r in parsed["metrics.jsonl"] if "loss" in r}
    assert losses[2] is None and losses[4] is None and math.isfinite(losses[3])
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in parsed["skipped_batches.jsonl"]] == [
        (2, None, None),
        (4, None, None),
    ]
    assert parsed["run_info.json"]["final"]["metrics"]["loss"] is None


def test_a_json_line_writes_each_non_finite_number_as_null() -> None:
    record = {"a": math.inf, "b": [-math.inf, 1.5], "c": np.float32("nan"), "d": (np.int64(3),)}
    line = json_line(record)
    assert line.endswith("\n") and line.count("\n") == 1
    assert strict_loads(line) == {"a": None, "b": [None, 1.5], "c": None, "d": [3]}
