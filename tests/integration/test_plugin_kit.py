"""The plugin author's kit, as a user meets it: docs/plugins.md's code through the real CLI,
the example package installed and enabled by its short name, `nnxtrain-plugins`, and the
one-line errors of plugins that cannot load.

The example package is built and installed with pip into a folder of its own (offline:
`--no-index --no-build-isolation`, with the venv's setuptools), which the CLI then sees
through PYTHONPATH; nothing is installed into the test environment itself.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from callbacks_for_tests import Recorder
from conftest import cli_env

from nnxtrain import PluginError, Trainer, compose
from nnxtrain.cli.plugins import default_keys, describe
from nnxtrain.train.registry import build_callbacks

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "nnxtrain-plugin-example"
BIN = Path(sys.executable).parent  # the venv's console scripts: nnxtrain, nnxtrain-plugins
TINY = ["model=tiny", "run.steps=4", "run.batch_size=4", "run.seq_len=16", "run.eval_every=2"]


def run(
    cmd: list[str], cwd: Path, *pythonpath: str, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    env = cli_env()
    env["PYTHONPATH"] = os.pathsep.join([*pythonpath, env["PYTHONPATH"]])
    # Reuse this session's compilation cache: CLI runs of one config compile it once.
    env["JAX_COMPILATION_CACHE_DIR"] = str(jax.config.jax_compilation_cache_dir)
    return subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def last_line(proc: subprocess.CompletedProcess[str]) -> str:
    return proc.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example package, built from a copy of its source and installed into `site/`."""
    root = tmp_path_factory.mktemp("example")
    shutil.copytree(EXAMPLE, root / "src", ignore=shutil.ignore_patterns("build", "*.egg-info"))
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps"]
    pip += ["--no-build-isolation", "--target", str(root / "site"), str(root / "src")]
    proc = subprocess.run(pip, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "site"


def docs_module() -> str:
    """The `# my_callbacks.py` code blocks of docs/plugins.md, in order: the user's file."""
    text = (REPO / "docs" / "plugins.md").read_text()
    blocks = re.findall(r"```python\n(# my_callbacks\.py.*?)```", text, flags=re.S)
    assert len(blocks) == 3, "docs/plugins.md: expected three my_callbacks.py blocks"
    first = [line for line in blocks[0].splitlines() if line.strip()]
    assert len(first) < 20, "the tutorial plugin must stay under 20 lines"
    return "\n".join(blocks)


@pytest.mark.slow
def test_docs_plugins_and_the_example_package_through_the_cli(site: Path, tmp_path: Path) -> None:
    (tmp_path / "my_callbacks.py").write_text(docs_module())
    args = [*TINY, "callbacks=default", "hydra.run.dir=run"]
    args += ["+callbacks.csv._target_=my_callbacks.LossToCsv", "+callbacks.csv.every=2"]
    args += ["+callbacks.best._target_=my_callbacks.KeepBest"]
    args += ["+callbacks.norm._target_=my_callbacks.ParamNorm", "+callbacks.norm.every=2"]
    args += ["+callbacks.summary._target_=run_summary"]  # the example package's short name
    # As docs/plugins.md says: the console script finds my_callbacks.py in the working dir.
    proc = run([str(BIN / "nnxtrain"), *args], tmp_path, str(site))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "run"

    summary = json.loads((out / "summary.json").read_text())
    assert summary["plugin"] == "summary" and summary["step"] == 4
    assert summary["reason"] == "completed" and summary["loss"] > 0
    assert summary["best_eval_step"] in (2, 4) and summary["best_eval_loss"] > 0

    rows = [line.split(",") for line in (out / "loss.csv").read_text().splitlines()]
    assert [int(step) for step, _ in rows] == [2, 4]
    assert re.search(r"^step 2: parameter norm \d+\.\d{3}$", proc.stdout, flags=re.M)
    assert re.search(r"^step 4: parameter norm \d+\.\d{3}$", proc.stdout, flags=re.M)

    # KeepBest asked for a save after the first evaluation (step 2): the checkpointer took
    # it at step 3, with KeepBest's state among the callbacks' states.
    meta = json.loads((out / "checkpoints" / "3" / "meta" / "metadata").read_text())
    states = meta["callbacks"]
    assert states["best"] == {"best": states["summary"]["best_eval"], "bad": 0}


@pytest.mark.slow
def test_what_is_importable_from_where(site: Path, tmp_path: Path) -> None:
    (tmp_path / "my_callbacks.py").write_text(docs_module())
    args = [*TINY, "callbacks=none", "hydra.run.dir=run"]
    csv = ["+callbacks.csv._target_=my_callbacks.LossToCsv"]

    # A module neither installed, nor on PYTHONPATH, nor in the working directory ...
    (tmp_path / "elsewhere").mkdir()
    proc = run([str(BIN / "nnxtrain"), *args, *csv], tmp_path / "elsewhere")
    assert proc.returncode == 2
    assert last_line(proc).endswith(
        "callbacks.csv._target_: cannot import 'my_callbacks.LossToCsv' (ModuleNotFoundError: "
        "No module named 'my_callbacks'). Fix: check the dotted path and that its package is "
        "installed."
    )
    # ... is found from the working directory by the console script, whose sys.path does
    # not hold it as `python -m`'s does (a dry run builds the callbacks and compiles) ...
    proc = run([str(BIN / "nnxtrain"), *args, *csv, "run.dry_run=true"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # ... and a short name is known only where its package is installed.
    summary = ["+callbacks.summary._target_=run_summary"]
    proc = run([str(BIN / "nnxtrain"), *args, *summary], tmp_path)
    assert proc.returncode == 2
    assert "callbacks.summary._target_: no plugin registered as 'run_summary'" in last_line(proc)
    assert "early_stopping" in last_line(proc)  # the known names are listed


@pytest.mark.slow
def test_nnxtrain_plugins_lists_every_plugin_with_its_options(site: Path, tmp_path: Path) -> None:
    proc = run([str(BIN / "nnxtrain-plugins")], tmp_path, str(site))
    assert proc.returncode == 0, proc.stderr[-3000:]
    entries = {
        block.splitlines()[0].split()[0]: block.splitlines()
        for block in proc.stdout.strip().split("\n\n")
    }
    assert entries["metrics_logger"][:3] == [
        "metrics_logger  (nnxtrain.plugins.metrics_logger:MetricsLogger)",
        "    Logs step metrics to the console, metrics.jsonl and (optionally) TensorBoard.",
        "    log_every: int = 10",
    ]
    assert entries["early_stopping"][1:7] == [
        "    Stops the run when a metric has not improved for `patience` checks in a row.",
        "    monitor: str = 'eval/loss'",
        "    mode: str = 'min'",
        "    patience: int = 3",
        "    min_delta: float = 0.0",
        "    check_every: int = 10",
    ]
    assert entries["profiler"][2:5] == [
        "    start_step: int = 5",
        "    num_steps: int = 3",
        "    directory: str = 'profile'",
    ]
    assert entries["run_summary"][:3] == [
        "run_summary  (nnxtrain_plugin_example:RunSummary)",
        "    Writes a JSON summary of the run (steps, end reason, losses) into the run directory.",
        "    filename: str = 'summary.json'",
    ]
    assert {"checkpointer", "memstats", "sharding_printer"} <= entries.keys()

    only = run([str(BIN / "nnxtrain-plugins"), "profiler"], tmp_path)
    assert only.returncode == 0 and only.stdout.startswith("profiler  (")
    assert "\n\n" not in only.stdout  # that one only
    unknown = run([str(BIN / "nnxtrain-plugins"), "run_summary"], tmp_path)  # not on the path
    assert unknown.returncode == 2
    assert last_line(unknown).startswith("nnxtrain-plugins: error: not registered: run_summary")


# -- bad plugins, in-process: each is one line that names the plugin ---------------------


def test_import_failure_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(PluginError) as err:
        build_callbacks({"mine": {"_target_": "no_such_module_xyz.Thing"}})
    assert str(err.value).startswith(
        "callbacks.mine._target_: cannot import 'no_such_module_xyz.Thing' (ModuleNotFoundError"
    )
    with pytest.raises(PluginError, match=r"^callbacks\.rec\._target_: .*not a subclass"):
        build_callbacks({"rec": {"_target_": "json.JSONDecoder"}})
    with pytest.raises(PluginError, match=r"^callbacks\.x: needs a _target_"):
        build_callbacks({"x": {"every": 2}})


def test_two_callbacks_with_one_name_are_refused() -> None:
    cfg = compose([*TINY, "callbacks=none"])
    with pytest.raises(PluginError, match=r"^callbacks: two plugins share a name in \["):
        Trainer(cfg, [Recorder(), Recorder()])
    named = [Recorder(), Recorder()]
    named[0].name = "a"
    assert [cb.name for cb in Trainer(cfg, named).callbacks] == ["a", "Recorder"]


def test_the_catalog_lists_a_plugin_that_cannot_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "raises_on_import.py").write_text("raise RuntimeError('no GPU here')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    lines, ok = describe("gone", "no_such_module_xyz:Thing", {})
    assert not ok and lines[0] == "gone  (no_such_module_xyz:Thing)"
    assert lines[1].startswith("    cannot load: entry point 'gone': cannot import")
    lines, ok = describe("bad", "raises_on_import:Thing", {})
    assert not ok
    assert lines[1].startswith(
        "    cannot load: entry point 'bad': cannot import 'raises_on_import:Thing' "
        "(RuntimeError: no GPU here)"
    )
    lines, ok = describe("stop", "nnxtrain.plugins.early_stopping:EarlyStopping", {})
    assert ok and "    patience: int = 3" in lines


def test_the_catalog_says_how_to_change_a_plugin_that_is_on_by_default() -> None:
    """A second checkpointer beside the default one fails at setup (both save to one
    directory): for a plugin a plain `nnxtrain` runs, the catalog names the key it runs
    under, and the way to drop it, instead of suggesting another copy."""
    defaults = default_keys()
    lines, ok = describe("checkpointer", "nnxtrain.plugins.checkpointer:Checkpointer", defaults)
    assert ok and lines[-1] == (
        "    on by default as callbacks.checkpoint "
        "(set: callbacks.checkpoint.OPTION=VALUE; off: ~callbacks.checkpoint)"
    )
    assert "checkpoint" in compose([]).callbacks
    assert "checkpoint" not in compose(["~callbacks.checkpoint"]).callbacks
    assert compose(["callbacks.checkpoint.every=7"]).callbacks["checkpoint"]["every"] == 7
    lines, ok = describe("memstats", "nnxtrain.plugins.memstats:MemStats", defaults)
    assert ok and lines[-1] == "    use: +callbacks.memstats._target_=memstats"
