"""Reading back what the tracker plugins logged, with each tool's own formats: no network.

- `mlflow_run(store)`: the one run in an MLflow store, read with `MlflowClient`.
- `wandb_records(run_dir)`: the records of a W&B offline run (`run-<id>.wandb`), decoded
  with W&B's own protobuf classes (`wandb.proto.wandb_internal_pb2.Record`). W&B 0.31
  ships no Python reader of that file; its framing is LevelDB's log format, which W&B
  documents and writes behind a 7-byte header (`:W&B`, magic 0xBEE1, version 0): 32 KiB
  blocks of chunks, each `crc32c (4) | length (2, little-endian) | type (1) | data`, a
  record being one FULL chunk or FIRST, MIDDLE..., LAST.
"""

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BLOCK, CHUNK_HEADER, FILE_HEADER = 32768, 7, b":W&B\xe1\xbe\x00"
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def leveldb_records(data: bytes) -> list[bytes]:
    """The records of a LevelDB-format log that starts with W&B's file header."""
    assert data[: len(FILE_HEADER)] == FILE_HEADER, data[:8]
    records, pos, pending = [], len(FILE_HEADER), b""
    while pos + CHUNK_HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < CHUNK_HEADER:  # the block's tail is padding
            pos += left_in_block
            continue
        length, kind = struct.unpack_from("<HB", data, pos + 4)
        if kind == 0 and length == 0:  # zero padding at the end of a block or file
            pos += left_in_block
            continue
        chunk = data[pos + CHUNK_HEADER : pos + CHUNK_HEADER + length]
        pos += CHUNK_HEADER + length
        if kind == FULL:
            records.append(chunk)
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            records.append(pending + chunk)
            pending = b""
    return records


@dataclass
class WandbRun:
    """What one offline W&B run recorded."""

    project: str = ""
    group: str = ""
    name: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    history: dict[int, dict[str, Any]] = field(default_factory=dict)  # step -> values
    summary: dict[str, Any] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    exit_code: int | None = None


def _key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


def wandb_run(path: Path) -> WandbRun:
    """Decodes one `run-<id>.wandb` file."""
    from wandb.proto import wandb_internal_pb2 as pb

    run = WandbRun()
    for data in leveldb_records(path.read_bytes()):
        record = pb.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.project, run.group = record.run.project, record.run.run_group
            run.name = record.run.display_name
            for item in record.run.config.update:
                run.config[_key(item)] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                run.config[_key(item)] = json.loads(item.value_json)
        elif kind == "history":
            values = {_key(i): json.loads(i.value_json) for i in record.history.item}
            run.history.setdefault(record.history.step.num, {}).update(values)
        elif kind == "summary":
            for item in record.summary.update:
                run.summary[_key(item)] = json.loads(item.value_json)
        elif kind == "files":
            run.files += [f.path for f in record.files.files]
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
    return run


def wandb_runs(root: Path) -> list[WandbRun]:
    """Every offline W&B run under `root` (a run dir, or WANDB_DIR)."""
    return [wandb_run(p) for p in sorted(root.rglob("offline-run-*/run-*.wandb"))]


def mlflow_runs(uri: str) -> list[Any]:
    """Every run in the MLflow store at `uri`, of every experiment, oldest first."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    return sorted(client.search_runs(ids), key=lambda r: r.info.start_time)


def history(uri: str, run_id: str, key: str) -> dict[int, float]:
    """One metric's history: step -> value."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}
