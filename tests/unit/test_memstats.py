"""Memstats: the reports it writes in a real run, and the allocator path with fake devices."""

import io
import json
import shutil
import types
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest
from nnxtrain.plugins import memstats
from nnxtrain.plugins.memstats import MemStats, host_memory, live_bytes
from rich.console import Console

from nnxtrain import ConfigError, TrainEndEvent, Trainer, compose

OVERRIDES = ["model=tiny", "run.steps=3", "run.batch_size=4", "run.seq_len=16"]
OVERRIDES += ["callbacks=none", "run.eval_every=0"]


def state_bytes(tree: Any) -> int:
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Trainer, list[dict[str, Any]]]:
    run_dir = tmp_path_factory.mktemp("memstats")
    trainer = Trainer(compose([*OVERRIDES, f"run.dir={run_dir}"]), [MemStats(every=1)])
    trainer.fit()
    lines = (run_dir / "memstats.jsonl").read_text().splitlines()
    return trainer, [json.loads(line) for line in lines]


def test_reports_at_init_first_step_every_step_and_end(run: Any) -> None:
    records = run[1]
    events = [(r["event"], r["step"]) for r in records]
    # every=1 with 3 steps: step 2 periodically; the last step is the "end" report.
    assert events == [
        ("compiled", 0),
        ("after_init", 0),
        ("after_first_step", 1),
        ("step", 2),
        ("end", 3),
    ]


def test_figures_are_sane_on_cpu(run: Any) -> None:
    trainer, records = run
    device_ids = {d.id for d in trainer.mesh.local_devices}
    for r in records:
        assert r["source"] == "live_arrays"  # CPU has no allocator statistics
        assert r["host_rss"] > 0 and r["host_peak_rss"] >= r["host_rss"]
        assert {d["id"] for d in r["devices"]} == device_ids
        assert all(d["limit"] is None for d in r["devices"])
    params = state_bytes(trainer.abstract_state.params)
    whole = state_bytes(trainer.abstract_state)  # params and two Adam moments
    assert whole > 2 * params
    for r in records[1:]:  # once the state exists, it is all live
        assert sum(d["live"] for d in r["devices"]) >= whole
    compiled = records[0]["compiled"]
    assert compiled["argument"] >= whole and compiled["total"] >= compiled["argument"]


def test_live_bytes_sums_the_live_arrays_per_device(monkeypatch) -> None:
    """Bytes of the arrays jax reports live, skipping deleted ones. The list is fixed here:
    the real one also holds arrays that other tests (and the collector) free at any time."""
    device = jax.devices()[0]
    x = jax.device_put(np.ones((1000,), np.float32), device)
    y = jax.device_put(np.ones((10,), np.int8), device)
    gone = jax.device_put(np.ones((100,), np.float32), device)
    gone.delete()
    monkeypatch.setattr(jax, "live_arrays", lambda: [x, gone, y])
    assert live_bytes() == {device.id: 4000 + 10}


class CpuDevice:
    """A device without allocator statistics, as on CPU."""

    def __init__(self, id: int):
        self.id = id

    def memory_stats(self) -> None:
        return None


def test_without_allocator_statistics_in_use_is_the_live_arrays_and_peak_the_most_seen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    figures = iter([{0: 1000, 1: 10}, {0: 400, 1: 30}])  # live bytes at two reports
    monkeypatch.setattr(memstats, "live_bytes", lambda: next(figures))
    trainer = stub(tmp_path, [CpuDevice(1), CpuDevice(0)])
    plugin = MemStats()
    plugin.on_train_end(trainer, TrainEndEvent(1, "completed", 1.0))
    plugin.on_train_end(trainer, TrainEndEvent(2, "completed", 1.0))
    records = [json.loads(x) for x in (tmp_path / "memstats.jsonl").read_text().splitlines()]
    assert [r["source"] for r in records] == ["live_arrays", "live_arrays"]
    rows = [
        [(d["id"], d["in_use"], d["limit"], d["peak"], d["live"]) for d in r["devices"]]
        for r in records
    ]
    assert rows == [
        [(0, 1000, None, 1000, 1000), (1, 10, None, 10, 10)],
        [(0, 400, None, 1000, 400), (1, 30, None, 30, 30)],
    ]


def test_host_memory_on_linux() -> None:
    host = host_memory()
    assert host["host_rss"] and host["host_total"]
    assert host["host_total"] > host["host_rss"] > 0


class FakeDevice:
    """A device whose allocator reports statistics, as GPUs and TPUs do."""

    def __init__(self, id: int, in_use: int):
        self.id, self.in_use = id, in_use

    def memory_stats(self) -> dict[str, int]:
        return {"bytes_in_use": self.in_use, "bytes_limit": 1000, "peak_bytes_in_use": 900}


def stub(tmp_path: Path, devices: list[FakeDevice], quiet: bool = False) -> Any:
    console = Console(file=io.StringIO(), width=100, quiet=quiet)
    return types.SimpleNamespace(
        mesh=types.SimpleNamespace(local_devices=devices), console=console, run_dir=str(tmp_path)
    )


def test_allocator_statistics_and_percent(tmp_path: Path) -> None:
    trainer = stub(tmp_path, [FakeDevice(1, 500), FakeDevice(0, 250)])
    MemStats().on_train_end(trainer, TrainEndEvent(7, "completed", 1.0))
    (record,) = [json.loads(x) for x in (tmp_path / "memstats.jsonl").read_text().splitlines()]
    assert record["event"] == "end" and record["step"] == 7
    assert record["source"] == "memory_stats"
    assert [(d["id"], d["in_use"], d["limit"], d["peak"]) for d in record["devices"]] == [
        (0, 250, 1000, 900),
        (1, 500, 1000, 900),
    ]
    out = trainer.console.file.getvalue()
    assert "25.0" in out and "50.0" in out  # percent of the limit, per device


def test_many_devices_are_shown_compactly(tmp_path: Path) -> None:
    devices = [FakeDevice(i, 100 + i) for i in range(10)]
    trainer = stub(tmp_path, devices)
    MemStats(max_rows=4).on_train_end(trainer, TrainEndEvent(1, "completed", 1.0))
    out = trainer.console.file.getvalue()
    assert "0 (min)" in out and "9 (max)" in out and "all 10" in out
    table_rows = [ln for ln in out.splitlines() if "B" in ln and "host" not in ln]
    assert len(table_rows) == 3
    record = json.loads((tmp_path / "memstats.jsonl").read_text())
    assert len(record["devices"]) == 10  # the file keeps every device


def test_quiet_console_writes_no_file(tmp_path: Path) -> None:
    trainer = stub(tmp_path, [FakeDevice(0, 1)], quiet=True)
    MemStats().on_train_end(trainer, TrainEndEvent(1, "completed", 1.0))
    assert not (tmp_path / "memstats.jsonl").exists()


def test_every_must_not_be_negative() -> None:
    plugin = MemStats(every=-1)
    plugin.name = "memstats"
    with pytest.raises(ConfigError, match=r"^callbacks\.memstats\.every: must be an integer >= 0"):
        plugin.on_setup(None, None)  # type: ignore[arg-type]


def test_a_resumed_run_drops_the_records_of_the_steps_it_redoes(tmp_path: Path) -> None:
    # A run saves at steps 2 and 4; losing checkpoint 4 (as a kill before it would) makes
    # the rerun resume from 2 and redo steps 3-4. Their records used to appear twice, and
    # the rerun's `compiled` record claimed step 0.
    from nnxtrain.plugins.checkpointer import Checkpointer

    overrides = [*OVERRIDES, "run.steps=4", f"run.dir={tmp_path}"]
    Trainer(compose(overrides), [MemStats(every=1), Checkpointer(every=2)]).fit()
    shutil.rmtree(tmp_path / "checkpoints" / "4")
    with open(tmp_path / "memstats.jsonl", "a") as f:
        f.write('{"event": "step", "st')  # a line a kill tore in half
    Trainer(compose(overrides), [MemStats(every=1), Checkpointer(every=2)]).fit()
    lines = (tmp_path / "memstats.jsonl").read_text().splitlines()
    events = [(r["event"], r["step"]) for r in map(json.loads, lines)]
    assert events == [
        ("compiled", 0),
        ("after_init", 0),
        ("after_first_step", 1),
        ("step", 2),
        ("compiled", 2),
        ("after_init", 2),
        ("after_first_step", 3),
        ("end", 4),
    ]
