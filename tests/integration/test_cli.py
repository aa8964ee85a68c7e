"""The real `nnxtrain` command in a subprocess: a short training run, its metrics and timing,
`--cfg job`, and the llama1b dry run; the installed console script run as a newcomer
would, with run.dir and a plugin module in the working directory."""

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cli_env, compile_cache_override, run_cli, run_cli_in_process

from nnxtrain import compose
from nnxtrain.parallel.distributed import auto_host_devices
from nnxtrain.train.accounting import count_params

pytestmark = pytest.mark.slow

METRIC_KEYS = {
    "step",
    "seconds",
    "loss",
    "lm_loss",
    "perplexity",
    "total_weights",
    "tokens_per_sec_per_device",
    "tflops_per_sec_per_device",
    "lr",
    "grad_norm",
}

# `short_run` (tests/conftest.py): 20 steps of the tiny model through the CLI, a line every 5
# steps, batch 4 x 16 tokens; tests/integration/test_checkpoint_integrity_cli.py damages a
# copy of its checkpoint.


def metrics_lines(run_dir: Path) -> list[dict]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if "loss" in x]  # training lines (eval lines have eval/ keys)


def test_short_run_exits_0(short_run):
    proc, _ = short_run
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr


def test_short_run_uses_one_cpu_device_per_core(short_run):
    """`run.host_devices=-1` (auto): the default fsdp mesh spans one device per core."""
    proc, run_dir = short_run
    cfg = compose(["model=tiny", "run.batch_size=4", "run.seq_len=16"])
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("XLA_FLAGS", raising=False)  # as in the CLI's environment (cli_env)
        expected = auto_host_devices(cfg) or 1
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["mesh"] == {"data": 1, "fsdp": expected, "tensor": 1}
    plural = "device" if expected == 1 else "devices"
    assert f"({expected} cpu {plural})" in proc.stdout


def test_short_run_logs_every_metric(short_run):
    proc, run_dir = short_run
    assert proc.returncode == 0, proc.stderr
    lines = metrics_lines(run_dir)
    assert [x["step"] for x in lines] == [5, 10, 15, 20]
    for line in lines:
        assert set(line) >= METRIC_KEYS, METRIC_KEYS - set(line)
        assert line["total_weights"] == 4 * 16
        assert line["seconds"] > 0
        assert line["tokens_per_sec_per_device"] > 0 and line["tflops_per_sec_per_device"] > 0


def test_short_run_learns(short_run):
    _, run_dir = short_run
    lines = metrics_lines(run_dir)
    assert lines[-1]["loss"] < lines[0]["loss"]


def test_short_run_writes_run_info(short_run):
    _, run_dir = short_run
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["num_params"] == count_params(compose(["model=tiny"]).model)
    assert info["final"]["step"] == 20 and info["final"]["reason"] == "completed"
    assert (run_dir / "config.yaml").exists()


def test_short_run_accounts_for_its_process_start_up(short_run):
    """The goodput account covers the whole process: Python's start, the imports and
    Hydra's composition, before the Trainer existed, are its `startup` bucket."""
    _, run_dir = short_run
    goodput = json.loads((run_dir / "run_info.json").read_text())["goodput"]
    assert goodput["seconds"]["startup"] > 0
    assert sum(goodput["seconds"].values()) == pytest.approx(goodput["wall_seconds"])


def test_every_line_without_a_note_is_near_the_median_so_far(short_run):
    """The first window includes compilation and says so; a later line without a note is
    within 1.5x of the median of the lines before it (without the first). The rule itself is
    tested with made-up times in tests/unit/test_metrics_logger.py; here it holds on a real
    run's figures, whatever the machine's speed."""
    _, run_dir = short_run
    lines = metrics_lines(run_dir)
    assert "warm-up" in lines[0].get("note", "")
    for i, line in enumerate(lines[1:], start=1):
        median = statistics.median([x["seconds"] for x in lines[1:i]] or [lines[0]["seconds"]])
        if not line.get("note"):
            assert median / 1.5 <= line["seconds"] <= 1.5 * median, (line, median)


def test_cfg_job_prints_the_composed_config(tmp_path):
    script = Path(sys.executable).with_name("nnxtrain")
    assert script.exists(), "the nnxtrain console script is not installed next to python"
    proc = subprocess.run(
        [str(script), "--cfg", "job", "model=tiny", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    from omegaconf import OmegaConf

    printed = OmegaConf.create(proc.stdout)
    assert {"model", "mesh", "run", "data", "optim", "callbacks"} <= set(printed)
    assert printed.model.name == "tiny" and printed.model.vocab_size == 64
    assert not (tmp_path / "run" / "run_info.json").exists()  # nothing ran


def test_llama1b_dry_run(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(
        ["+experiment=llama1b", "run.dry_run=true", f"hydra.run.dir={run_dir}"], tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    info = json.loads((run_dir / "run_info.json").read_text())
    expected = count_params(compose(["+experiment=llama1b"]).model)
    assert expected == 1_104_218_112
    assert info["num_params"] == expected
    for key in ("tflops_per_step_per_device", "learnable_tflops", "attention_tflops"):
        assert info[key] > 0
    assert info["tflops_per_step_per_device"] == pytest.approx(
        info["learnable_tflops"] + info["attention_tflops"]
    )
    assert info["compiled_memory"]["total"] > 0
    assert "final" not in info  # compiled, never trained


# A plugin module beside the user, as docs/plugins.md writes one: it leaves a file in the
# run dir, which the run's last lines must list like any other.
PLUGIN = """
from nnxtrain import Callback


class Hello(Callback):
    def on_setup(self, trainer, event):
        with open(f"{event.run_dir}/hello.txt", "w") as f:
            f.write("hello")
"""
CONSOLE_RUN = ["model=tiny", "run.steps=2", "run.batch_size=2", "run.seq_len=8"]


@pytest.fixture(scope="module")
def console_run(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[subprocess.CompletedProcess[str], Path]:
    """The installed `nnxtrain` script (not `python -m`, which would put the working
    directory on the import path itself), from a directory holding my_plugin.py, with
    `run.dir=run` and the plugin switched on as the README shows: its process and cwd."""
    cwd = tmp_path_factory.mktemp("console")
    (cwd / "my_plugin.py").write_text(PLUGIN)
    env = cli_env()
    env.pop("PYTHONPATH")  # nothing but the working directory can make my_plugin importable
    args = [*CONSOLE_RUN, "run.dir=run", "+callbacks.hello._target_=my_plugin.Hello"]
    script = Path(sys.executable).with_name("nnxtrain")
    proc = subprocess.run(
        [str(script), *args, compile_cache_override()],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, cwd


def test_a_plugin_module_in_the_working_directory_is_found(console_run):
    _, cwd = console_run
    assert (cwd / "run" / "hello.txt").read_text() == "hello"


def test_a_run_given_run_dir_writes_nothing_outside_it(console_run):
    """Hydra wrote outputs/<date>/<time>/ (its .hydra/, a log file, job_status.json) for
    every run; with run.dir nothing of Hydra's is written, there or in the run dir."""
    _, cwd = console_run
    assert sorted(p.name for p in cwd.iterdir() if p.name != "__pycache__") == [
        "my_plugin.py",
        "run",
    ]
    run = {p.name for p in (cwd / "run").iterdir()}
    assert {"config.yaml", "run_info.json", "metrics.jsonl", "checkpoints"} <= run
    assert not run & {".hydra", "nnxtrain.log", "train.log", "job_status.json"}


def test_the_run_ends_saying_where_its_results_are(console_run):
    """After the goodput table: the run dir, then what is in it, folders first."""
    proc, cwd = console_run
    run = cwd / "run"
    *_, table_end, where, entries = proc.stdout.rstrip().splitlines()
    assert table_end.startswith("└")  # the goodput table's last line
    assert where == f"results in {run}:"
    shown = entries.split()
    assert shown[:1] == ["checkpoints/"] and "metrics.jsonl" in shown and "hello.txt" in shown
    on_disk = [p.name + "/" * p.is_dir() for p in run.iterdir() if not p.name.startswith(".")]
    assert sorted(shown) == sorted(on_disk)
    assert (run / ".lock").exists() and ".lock" not in shown


def test_a_run_given_run_dir_that_fails_on_a_typo_writes_no_outputs_dir(tmp_path):
    proc = run_cli_in_process([*CONSOLE_RUN, "model.dtype=flaot32", "run.dir=run"], tmp_path)
    assert proc.returncode == 2 and "model.dtype: unknown value 'flaot32'" in proc.stderr
    assert not (tmp_path / "outputs").exists()
    # the run dir, made for the run before its checks, is removed again: nothing is left
    assert [p.name for p in tmp_path.iterdir()] == []
