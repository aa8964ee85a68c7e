"""Memstats: device and host memory at the moments that matter, on the console and in JSONL.

Reports after the state is initialised (`after_init`), after the first step
(`after_first_step`), every `every` steps (`step`; 0 turns these off) and at the end
(`end`), plus the compiled step's memory analysis (`compiled`). Each report is a compact
table (one row per device; with more than `max_rows` devices only the least and most
loaded) and one JSON line in `<run_dir>/memstats.jsonl`:

    {"event": "step", "step": 100, "source": "memory_stats", "host_rss": ...,
     "devices": [{"id": 0, "in_use": ..., "limit": ..., "peak": ..., "live": ...}], ...}

Where the backend has `device.memory_stats()` (GPU, TPU), `in_use`, `limit` and `peak` are
the allocator's figures. On CPU it has none: `in_use` is then the bytes of live jax arrays
on that device (`jax.live_arrays()`), `limit` is null and `peak` the largest `in_use` this
plugin has seen; the host's RSS and peak RSS tell the rest. `live` is always the live
arrays' bytes. It waits for a step only at the steps it reports.

A resumed run redoes the steps after its checkpoint, so before its first record memstats
cuts memstats.jsonl back to the restored step (`nnxtrain.drop_records_after`; a fresh run
starts it empty). A dry run only appends its `compiled` record.

    nnxtrain +callbacks.mem._target_=memstats +callbacks.mem.every=50
"""

import math
import os
import sys
import time
from typing import IO, Any

import jax
from rich import box
from rich.table import Table

from nnxtrain import (
    Callback,
    CompileEvent,
    SetupEvent,
    StepEndEvent,
    TrainEndEvent,
    TrainerView,
    TrainStartEvent,
    check_int,
    drop_records_after,
    format_bytes,
    json_line,
)


def live_bytes() -> dict[int, int]:
    """Device id -> bytes of the live jax arrays' shards on that device."""
    totals: dict[int, int] = {}
    for arr in jax.live_arrays():
        try:
            if arr.is_deleted():
                continue
            for shard in arr.addressable_shards:
                totals[shard.device.id] = totals.get(shard.device.id, 0) + shard.data.nbytes
        except RuntimeError:  # deleted (donated) between the check and the read
            continue
    return totals


def host_memory() -> dict[str, int | None]:
    """This process's resident set size now and at its peak, and the host's total memory."""
    rss = peak = total = None
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        total = os.sysconf("SC_PHYS_PAGES") * page
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * page
    except (OSError, ValueError, AttributeError):
        pass
    try:
        import resource

        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = maxrss if sys.platform == "darwin" else maxrss * 1024  # bytes vs KiB
        peak = max(peak, rss or 0)  # ru_maxrss is sampled: it can lag the current RSS
    except ImportError:
        pass
    return {"host_rss": rss, "host_peak_rss": peak, "host_total": total}


class MemStats(Callback):
    """Reports per-device and host memory; writes memstats.jsonl."""

    def __init__(self, every: int = 100, jsonl: bool = True, max_rows: int = 8):
        self.every, self.use_jsonl, self.max_rows = every, jsonl, max_rows
        self._file: IO[str] | None = None
        self._peaks: dict[int, int] = {}
        self._stepped = False
        self._resumed_at: int | None = None  # the restored step (0: fresh); None: append

    def snapshot(self, trainer: TrainerView) -> tuple[str, list[dict[str, Any]]]:
        """The memory source ('memory_stats' or 'live_arrays') and one dict per device."""
        devices = trainer.mesh.local_devices if trainer.mesh is not None else jax.local_devices()
        live, rows, source = live_bytes(), [], "memory_stats"
        for device in sorted(devices, key=lambda d: d.id):
            stats = device.memory_stats() or {}
            in_use, peak = stats.get("bytes_in_use"), stats.get("peak_bytes_in_use")
            if in_use is None:  # CPU: no allocator statistics
                source, in_use = "live_arrays", live.get(device.id, 0)
                peak = self._peaks[device.id] = max(self._peaks.get(device.id, 0), in_use)
            limit, here = stats.get("bytes_limit") or None, live.get(device.id, 0)
            rows.append(dict(id=device.id, in_use=in_use, limit=limit, peak=peak, live=here))
        return source, rows

    def _report(self, trainer: TrainerView, kind: str, step: int, **extra: Any) -> dict[str, Any]:
        source, devices = self.snapshot(trainer)
        record = {"event": kind, "step": step, "source": source, **host_memory(), **extra}
        record["devices"], record["time"] = devices, time.time()
        self._write(trainer, record)
        if kind == "compiled":
            return record
        trainer.console.print(
            f"memory at step {record['step']} ({record['event']}, {record['source']}): host RSS "
            f"{format_bytes(record['host_rss'])}, peak {format_bytes(record['host_peak_rss'])} of "
            f"{format_bytes(record['host_total'])}",
            markup=False,
            highlight=False,
        )
        table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
        for header in ("device", "in use", "limit", "%", "peak", "live arrays"):
            table.add_column(header, justify="left" if header == "device" else "right")
        shown = [(str(d["id"]), d) for d in devices]
        if len(devices) > self.max_rows:  # compact: least and most loaded, then the sum
            lo, hi = (f(devices, key=lambda d: d["in_use"]) for f in (min, max))
            shown = [(f"{lo['id']} (min)", lo), (f"{hi['id']} (max)", hi)]
        for label, d in shown:
            pct = f"{100 * d['in_use'] / d['limit']:.1f}" if d["limit"] else "-"
            cells = (d["in_use"], d["limit"], d["peak"], d["live"])
            table.add_row(label, *map(format_bytes, cells[:2]), pct, *map(format_bytes, cells[2:]))
        if len(devices) > self.max_rows:
            total = sum(d["in_use"] for d in devices)
            table.add_row(f"all {len(devices)}", format_bytes(total), "", "", "", "")
        trainer.console.print(table)
        return record

    def on_compile(self, trainer: TrainerView, event: CompileEvent) -> None:
        steps = [s for s in (event.train, event.eval) if s is not None]
        # A checkpoint was restored (in on_setup) if the state exists already.
        state = trainer.state
        at = int(jax.device_get(state.step)) if state is not None else 0
        if not trainer.config.run.dry_run:
            self._resumed_at = at
        record = self._report(
            trainer,
            "compiled",
            at,
            compiled=event.train.memory.as_dict(),
            **({"eval_compiled": event.eval.memory.as_dict()} if event.eval else {}),
        )
        limit = min((d["limit"] for d in record["devices"] if d["limit"]), default=None)
        for step in steps:
            m = step.memory
            trainer.console.print(
                f"memory of the compiled {step.name} step per device: {m.summary()}"
                + (f" ({100 * m.total / limit:.1f}% of the device limit)" if limit else ""),
                markup=False,
                highlight=False,
            )

    def on_setup(self, trainer: TrainerView, event: SetupEvent) -> None:
        # (from a config the types are checked before; this is for a plugin built in Python)
        key = f"callbacks.{self.name}"
        check_int(f"{key}.every", self.every, 0, f"set {key}.every=100")
        check_int(f"{key}.max_rows", self.max_rows, -math.inf, f"set {key}.max_rows=8")
        self.max_rows = max(self.max_rows, 2)  # the compact table shows two devices and the sum

    def on_train_start(self, trainer: TrainerView, event: TrainStartEvent) -> None:
        self._resumed_at = event.step
        jax.block_until_ready(trainer.state)  # count the initialised state, not a promise
        self._report(trainer, "after_init", event.step)

    def on_step_end(self, trainer: TrainerView, event: StepEndEvent) -> None:
        if not self._stepped:
            kind = "after_first_step"
        elif self.every and event.step % self.every == 0 and event.step != event.num_steps:
            kind = "step"  # the last step is reported as "end"
        else:
            return
        self._stepped = True
        event.record()  # wait for this step, so the figures are after it
        self._report(trainer, kind, event.step)

    def on_train_end(self, trainer: TrainerView, event: TrainEndEvent) -> None:
        self._report(trainer, "end", event.step)
        self._close()

    def _write(self, trainer: TrainerView, record: dict[str, Any]) -> None:
        if not self.use_jsonl or trainer.console.quiet:
            return
        if self._file is None:
            path = os.path.join(trainer.run_dir, "memstats.jsonl")
            if self._resumed_at is not None:  # those steps are redone: drop their records
                drop_records_after(path, self._resumed_at)
            self._file = open(path, "a")  # noqa: SIM115
        self._file.write(json_line(record))
        self._file.flush()

    def teardown(self, trainer: TrainerView) -> None:
        self._close()

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
