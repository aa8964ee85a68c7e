"""Sharding printer: where every parameter and annotated activation lives on the mesh.

At `on_setup` it prints a table of every parameter: path, shape and dtype, logical axis
names, physical mesh axes (the PartitionSpec, one entry per dimension) and the shape of
one device's shard, then a one-line summary of the optimizer state (leaves and bytes per
device). At `on_compile` it prints every annotated activation of the traced step: name,
shape, logical and physical axes. Everything printed also goes, as plain text, to
`<run_dir>/shardings.txt`, written at `on_compile`: a rerun of a finished run (restored at
run.steps: nothing to do, never compiled) leaves the file it finds as it is. When setup or
compilation raises, the parameter table is written then, for the post-mortem.

    nnxtrain +callbacks.shardings._target_=sharding_printer \
        +callbacks.shardings.only_sharded=true +callbacks.shardings.filter=attn

Options: `only_sharded` keeps only tensors split over at least one mesh axis of size > 1;
`filter` keeps paths/names matching a regex (or containing it, if it is not a valid
regex); `optimizer` adds the optimizer-state summary; `console` prints to the console;
`file` names the file under the run directory. Uses only the public plugin API.
"""

import io
import math
import os
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from rich import box
from rich.console import Console
from rich.table import Table

from nnxtrain import (
    Callback,
    CompileEvent,
    ExceptionEvent,
    SetupEvent,
    TrainerView,
    format_bytes,
)

Row = tuple[str, ...]


def _axes(entry: Any) -> tuple[str, ...]:
    """Mesh axes of one PartitionSpec entry (None, a name, or a tuple of names)."""
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def format_physical(spec: PartitionSpec, rank: int) -> str:
    """`(None, fsdp, data+fsdp)`: one entry per dimension (missing ones are None)."""
    entries = [*spec, *[None] * (rank - len(spec))]
    return "(" + ", ".join("+".join(_axes(e)) or "None" for e in entries) + ")"


def format_logical(names: Sequence[str | None] | None, rank: int) -> str:
    """`(layers, embed, mlp)`; `-` for a dimension without a name."""
    return "(" + ", ".join(str(n) if n else "-" for n in (names or [None] * rank)) + ")"


def is_split(spec: PartitionSpec, mesh: Mesh) -> bool:
    """Whether the spec splits a tensor over at least one mesh axis of size > 1."""
    return any(mesh.shape[a] > 1 for e in spec for a in _axes(e))


def shard_bytes(shape: Sequence[int], dtype: Any, sharding: NamedSharding) -> int:
    """Bytes of one device's shard."""
    return math.prod(sharding.shard_shape(tuple(shape))) * np.dtype(dtype).itemsize


class ShardingPrinter(Callback):
    """Prints parameter and activation shardings; writes them to shardings.txt."""

    def __init__(
        self,
        only_sharded: bool = False,
        filter: str | None = None,
        optimizer: bool = True,
        console: bool = True,
        file: str = "shardings.txt",
    ):
        self.only_sharded, self.use_optimizer, self.use_console = only_sharded, optimizer, console
        self.file, self.filter = file, str(filter) if filter else None
        try:
            self._regex: re.Pattern[str] | None = re.compile(self.filter) if self.filter else None
        except re.error:
            self._regex = None  # not a regex: match as a plain substring
        self._path = ""
        # The file's text, held from on_setup: only on_compile knows there is a run to
        # describe (the checkpointer may restore a finished run after on_setup).
        self._pending: list[str] = []

    def _keep(self, name: str, spec: PartitionSpec, mesh: Mesh) -> bool:
        if self.only_sharded and not is_split(spec, mesh):
            return False
        if self.filter is None:
            return True
        return bool(self._regex.search(name)) if self._regex else self.filter in name

    def on_setup(self, trainer: TrainerView, event: SetupEvent) -> None:
        mesh, rows, total, per_device, shown = event.mesh, [], 0, 0, 0
        for path, var in nnx.to_flat_state(event.abstract_state.params):
            sds, name = var.get_value(), "/".join(str(p) for p in path)
            nbytes, rank = shard_bytes(sds.shape, sds.dtype, sds.sharding), len(sds.shape)
            total, per_device = total + 1, per_device + nbytes
            if not self._keep(name, sds.sharding.spec, mesh):
                continue
            shown += nbytes
            rows.append(
                (
                    name,
                    f"{sds.dtype}{list(sds.shape)}",
                    format_logical(var.get_metadata().get("out_sharding"), rank),
                    format_physical(sds.sharding.spec, rank),
                    str(list(sds.sharding.shard_shape(tuple(sds.shape)))),
                )
            )
        mesh_desc = " ".join(f"{k}={v}" for k, v in mesh.shape.items())
        title = f"parameters ({len(rows)} of {total} shown; mesh {mesh_desc})"
        headers = ("path", "shape", "logical axes", "mesh axes", "per-device shard")
        lines = [f"parameters: {total} tensors, {format_bytes(per_device)} per device"]
        if self.only_sharded or self.filter:
            lines.append(f"shown: {len(rows)} tensors, {format_bytes(shown)} per device")
        if self.use_optimizer:
            leaves = jax.tree.leaves(event.abstract_state.opt_state)
            opt_bytes = sum(shard_bytes(x.shape, x.dtype, x.sharding) for x in leaves)
            lines.append(
                f"optimizer state: {len(leaves)} leaves, {format_bytes(opt_bytes)} per device"
            )
        self._path = os.path.join(event.run_dir, self.file)
        self._pending = [self._emit(trainer, title, headers, rows, lines)]

    def on_compile(self, trainer: TrainerView, event: CompileEvent) -> None:
        mesh = trainer.mesh
        assert mesh is not None
        for step in (event.train, event.eval):
            if step is None:
                continue
            records = list(step.activations.values())
            rows = [
                (
                    r.name,
                    str(list(r.shape)),
                    format_logical(r.logical, len(r.shape)),
                    format_physical(r.physical, len(r.shape)),
                )
                for r in records
                if self._keep(r.name, r.physical, mesh)
            ]
            title = (
                f"{step.name} step activations ({len(rows)} of {len(records)} shown; inside "
                "scanned layers the layer axis is not part of the shape)"
            )
            headers = ("name", "shape", "logical axes", "mesh axes")
            self._pending.append(self._emit(trainer, title, headers, rows, []))
        self._write(trainer)

    def on_exception(self, trainer: TrainerView, event: ExceptionEvent) -> None:
        if event.where == "setup":  # a failed compile: its layout is what one looks at
            self._write(trainer)

    def _write(self, trainer: TrainerView) -> None:
        """Writes what is pending to the file (process 0 only), once."""
        if not trainer.console.quiet and self._path and self._pending:
            with open(self._path, "w") as f:
                f.write("".join(text + "\n\n" for text in self._pending))
        self._pending = []

    def _emit(
        self,
        trainer: TrainerView,
        title: str,
        headers: Sequence[str],
        rows: Sequence[Row],
        lines: list[str],
    ) -> str:
        """Prints a table (with its title and lines) and returns it as plain text."""
        table = Table(box=box.MINIMAL)
        for header in headers:
            table.add_column(header, overflow="fold")
        for row in rows:
            table.add_row(*row)
        # Plain text wide enough that no cell wraps: one line per row, in the file and in logs.
        widths = [max(len(c) for c in col) for col in zip(headers, *rows, strict=True)]
        buf = io.StringIO()
        width = max(sum(w + 3 for w in widths) + 4, 80)
        Console(file=buf, width=width, color_system=None, soft_wrap=False).print(table)
        text = "\n".join([title, *(ln.rstrip() for ln in buf.getvalue().splitlines()), *lines])
        if self.use_console and trainer.console.is_terminal:  # fit the terminal
            trainer.console.print(title, markup=False, highlight=False)
            trainer.console.print(table)
            for line in lines:
                trainer.console.print(line, markup=False, highlight=False)
        elif self.use_console:
            trainer.console.print(text, markup=False, highlight=False, soft_wrap=True)
        return text
