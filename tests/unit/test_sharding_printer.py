"""The sharding printer: every parameter and activation in shardings.txt, and its filters."""

import dataclasses
import io
import types
from pathlib import Path
from typing import Any

import pytest
from conftest import shardings_table
from flax import nnx
from jax.sharding import AbstractMesh, PartitionSpec
from nnxtrain.plugins.sharding_printer import ShardingPrinter, format_physical, is_split
from rich.console import Console

from nnxtrain import Callback, CompileEvent, ExceptionEvent, SetupEvent, Trainer, compose

OVERRIDES = ["model=tiny", "run.steps=1", "run.batch_size=4", "run.seq_len=16"]
OVERRIDES += ["callbacks=none", "run.eval_every=0"]


class Keep(Callback):
    """Keeps the events, so that other printers can be driven with them afterwards."""

    def on_setup(self, trainer: Trainer, event: SetupEvent) -> None:
        self.setup = event

    def on_compile(self, trainer: Trainer, event: CompileEvent) -> None:
        self.compile = event


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Trainer, Keep, Path]:
    run_dir = tmp_path_factory.mktemp("shardings")
    keep = Keep()
    trainer = Trainer(compose([*OVERRIDES, f"run.dir={run_dir}"]), [ShardingPrinter(), keep])
    trainer.fit()
    return trainer, keep, run_dir


def params(trainer: Trainer) -> dict[str, Any]:
    flat = nnx.to_flat_state(trainer.abstract_state.params)
    return {"/".join(map(str, path)): var for path, var in flat}


def drive(trainer: Trainer, keep: Keep, tmp: Path, mesh: Any = None, **options: Any) -> str:
    """Runs a fresh printer's hooks on the kept events (optionally on another mesh)."""
    printer = ShardingPrinter(console=False, **options)
    mesh = mesh or trainer.mesh
    stub: Any = types.SimpleNamespace(
        mesh=mesh, activations=trainer.activations, console=Console(file=io.StringIO())
    )
    printer.on_setup(stub, dataclasses.replace(keep.setup, mesh=mesh, run_dir=str(tmp)))
    printer.on_compile(stub, keep.compile)
    assert stub.console.file.getvalue() == ""  # console=False prints nothing
    return (tmp / "shardings.txt").read_text()


def test_every_parameter_and_activation_with_its_axes(run: Any) -> None:
    trainer, _, run_dir = run
    table = shardings_table((run_dir / "shardings.txt").read_text())
    for name, var in params(trainer).items():
        sds, logical = var.get_value(), var.get_metadata()["out_sharding"]
        assert name in table, name
        assert table[name][1] == f"{sds.dtype}{list(sds.shape)}"
        assert table[name][2] == "(" + ", ".join(logical) + ")"
        assert table[name][3] == format_physical(sds.sharding.spec, len(sds.shape))
    assert trainer.activations  # the model annotates its activations
    for name, record in trainer.activations.items():
        assert table[name][1] == str(list(record.shape))
        assert table[name][2] == "(" + ", ".join(str(n) for n in record.logical) + ")"
    assert "optimizer state: " in (run_dir / "shardings.txt").read_text()


def test_embed_axes_map_to_fsdp(run: Any) -> None:
    table = shardings_table((run[2] / "shardings.txt").read_text())
    embed = table["embed"]
    assert embed[2] == "(vocab, embed)" and embed[3] == "(tensor, fsdp)"


def test_filter_regex_and_substring(run: Any, tmp_path: Path) -> None:
    trainer, keep = run[0], run[1]
    for sub in "abc":
        (tmp_path / sub).mkdir()
    shown = shardings_table(drive(trainer, keep, tmp_path / "a", filter="attn/w[qk]|logits"))
    assert set(shown) == {"layers/attn/wq", "layers/attn/wk", "logits"}
    shown = shardings_table(drive(trainer, keep, tmp_path / "b", filter="norm"))
    assert set(shown) == {n for n in params(trainer) if "norm" in n}
    assert len(shown) == 3
    # Not a valid regex: matched as a plain substring, which nothing contains.
    assert shardings_table(drive(trainer, keep, tmp_path / "c", filter="scale[")) == {}


def test_only_sharded_keeps_tensors_split_over_a_real_axis(run: Any, tmp_path: Path) -> None:
    trainer, keep = run[0], run[1]
    # One device in-process: ask the printer about a 4-way fsdp mesh of the same axes.
    mesh = AbstractMesh((1, 4, 1), ("data", "fsdp", "tensor"))
    shown = shardings_table(drive(trainer, keep, tmp_path, mesh=mesh, only_sharded=True))
    expected = {
        n for n, v in params(trainer).items() if "embed" in v.get_metadata()["out_sharding"]
    }
    expected |= {n for n, r in trainer.activations.items() if "activation_batch" in r.logical}
    assert expected and set(shown) == expected
    assert "layers/attn_norm/scale" not in shown


def test_nothing_is_split_on_one_device(run: Any, tmp_path: Path) -> None:
    assert shardings_table(drive(run[0], run[1], tmp_path, only_sharded=True)) == {}


def test_format_physical_and_is_split() -> None:
    spec = PartitionSpec(("data", "fsdp"), None)
    assert format_physical(spec, 3) == "(data+fsdp, None, None)"
    assert is_split(spec, AbstractMesh((1, 2, 1), ("data", "fsdp", "tensor")))
    assert not is_split(spec, AbstractMesh((1, 1, 4), ("data", "fsdp", "tensor")))
    assert not is_split(PartitionSpec(), AbstractMesh((2, 2, 2), ("data", "fsdp", "tensor")))


def test_quiet_console_writes_no_file(run: Any, tmp_path: Path) -> None:
    trainer, keep = run[0], run[1]
    printer = ShardingPrinter()
    stub: Any = types.SimpleNamespace(
        mesh=trainer.mesh, activations=trainer.activations, console=Console(quiet=True)
    )
    printer.on_setup(stub, dataclasses.replace(keep.setup, run_dir=str(tmp_path)))
    printer.on_compile(stub, keep.compile)
    assert not (tmp_path / "shardings.txt").exists()


def test_the_file_is_written_at_compile_or_when_setup_fails(run: Any, tmp_path: Path) -> None:
    """Not at on_setup: a rerun of a finished run stops after it, and keeps the file it has."""
    trainer, keep = run[0], run[1]
    stub: Any = types.SimpleNamespace(
        mesh=trainer.mesh, activations=trainer.activations, console=Console(file=io.StringIO())
    )
    for where, written in (("setup", True), ("loop", False)):
        out = tmp_path / where
        out.mkdir()
        printer = ShardingPrinter(console=False)
        printer.on_setup(stub, dataclasses.replace(keep.setup, run_dir=str(out)))
        assert not (out / "shardings.txt").exists()
        printer.on_exception(stub, ExceptionEvent(0, RuntimeError("compile failed"), where))
        assert (out / "shardings.txt").exists() == written, where
    text = (tmp_path / "setup" / "shardings.txt").read_text()
    assert "embed" in shardings_table(text) and "activations" not in text
