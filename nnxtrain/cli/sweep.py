"""Sweep bookkeeping: each job's status file, and the summary written when a multirun ends.

Every CLI job writes `job_status.json` into its Hydra job directory (success or failure:
overrides, status, one-line error, final and best losses, tokens/s, wall time).
`SweepSummary`, a Hydra callback switched on in conf/config.yaml, reads them all when the
multirun ends — whatever the launcher, since it only reads files — and writes into the
sweep directory:

- `summary.csv` and `summary.json`: one row per job;
- `loss_curves.png`: train loss against step, one line per job, labelled by its overrides
  (needs matplotlib; skipped with a note when it is not installed);

and prints the same table with rich. When any job failed, the sweep's process then exits
1 with one line saying how many.
"""

import csv
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from nnxtrain.jsonio import write_json

STATUS_FILE = "job_status.json"
COLUMNS = (
    "job",
    "overrides",
    "status",
    "final_loss",
    "final_eval_loss",
    "best_eval_loss",
    "tokens_per_sec",
    "wall_seconds",
    "error",
)


def write_status(job_dir: str, status: dict[str, Any]) -> None:
    """Writes a job's status atomically (a reader never sees half a file)."""
    os.makedirs(job_dir, exist_ok=True)
    write_json(os.path.join(job_dir, STATUS_FILE), status)


def read_statuses(sweep_dir: Path) -> list[dict[str, Any]]:
    """Every job's status under the sweep dir, by job number."""
    rows = []
    for path in sweep_dir.glob(f"*/{STATUS_FILE}"):
        row = json.loads(path.read_text())
        row["dir"] = str(path.parent)
        rows.append(row)
    return sorted(rows, key=lambda r: int(r.get("job", 0)))


def _loss_curve(run_dir: str) -> tuple[list[int], list[float]]:
    """Train loss by step from the run's metrics.jsonl, in step order. A line that is not
    a record (the last one, when a kill tore it) is skipped; a step logged twice (by a
    resume before the logger dropped redone steps) takes its later record."""
    path = Path(run_dir) / "metrics.jsonl"
    losses: dict[int, float] = {}
    if path.exists():
        for line in path.read_bytes().splitlines():
            try:
                rec = json.loads(line)
                if isinstance(rec, dict) and "loss" in rec:
                    losses[int(rec["step"])] = float(rec["loss"])
            except (ValueError, TypeError, KeyError):
                continue
    steps = sorted(losses)
    return steps, [losses[s] for s in steps]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.4g}"
    return "-" if value is None or value == "" else str(value)


def summarize(sweep_dir: Path, console: Console | None = None) -> list[dict[str, Any]]:
    """Writes summary.csv, summary.json and loss_curves.png; prints the table."""
    rows = read_statuses(sweep_dir)
    common = set.intersection(*(set(r.get("overrides", [])) for r in rows)) if rows else set()
    table_rows = [{c: r.get(c) for c in COLUMNS} for r in rows]
    for row, raw in zip(table_rows, rows, strict=True):
        # The swept overrides identify a job; those shared by all go in the title.
        row["overrides"] = " ".join(o for o in raw.get("overrides", []) if o not in common)
        status = str(raw.get("status", ""))
        if ": " in status and status.split(": ")[0] in ("not finite", "stopped", "preempted"):
            row["status"], detail = status.split(": ", 1)
            row["error"] = row["error"] or detail
    with open(sweep_dir / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(table_rows)
    write_json(str(sweep_dir / "summary.json"), table_rows)

    title = f"sweep summary: {sweep_dir}" + (
        f"\ncommon: {' '.join(sorted(common))}" if common else ""
    )
    table = Table(title=title)
    for c in COLUMNS:
        table.add_column(c, overflow="fold")
    for row in table_rows:
        table.add_row(*(_fmt(row[c]) for c in COLUMNS))
    console = console or Console(width=None if Console().is_terminal else 160)
    console.print(table)
    _plot(sweep_dir, rows, common, console)
    return table_rows


def _plot(sweep_dir: Path, rows: list[dict[str, Any]], common: set[str], console: Console) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        console.print("matplotlib is not installed: no loss_curves.png (pip install matplotlib)")
        return
    fig, ax = plt.subplots(figsize=(8, 5))
    for row in rows:
        steps, losses = _loss_curve(row.get("run_dir") or row["dir"])
        if steps:
            label = " ".join(o for o in row.get("overrides", []) if o not in common)
            ax.plot(steps, losses, label=label or f"job {row['job']}")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax.set_title("loss curves")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(sweep_dir / "loss_curves.png", dpi=100)
    plt.close(fig)


# Job statuses that count as failed (the summary's status column): the sweep then exits 1.
FAILED = ("failed", "not finite")


class SweepSummary(HydraCallback):
    """Hydra callback: writes the sweep summary when a multirun ends; exits 1, saying how
    many, when any job failed (the sweep itself ran every job)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        rows = summarize(sweep_dir)
        failed = sum(row["status"] in FAILED for row in rows)
        if failed:
            print(
                f"nnxtrain: {failed} of {len(rows)} jobs failed (see {sweep_dir / 'summary.csv'})",
                file=sys.stderr,
            )
            sys.exit(1)
