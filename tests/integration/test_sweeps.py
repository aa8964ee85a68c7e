"""Hydra multirun: sequential jobs in one process, a failing job, submitit, Optuna, summary."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import run_cli, run_cli_in_process

pytestmark = pytest.mark.slow

TINY = [
    "model=tiny",
    "run.steps=8",
    "run.host_devices=1",  # as the in-process fresh run (its JAX has 1 CPU device)
    "run.batch_size=4",
    "run.seq_len=16",
    "run.log_every=1",
    "run.eval_every=4",
    "run.eval_batches=1",
    "~callbacks.checkpoint",
]


def _nnxtrain(*args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(list(args), cwd=Path.cwd(), timeout=600)


def _losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r]


def _status(job_dir: Path) -> dict:
    return json.loads((job_dir / "job_status.json").read_text())


# A plugin holds the host for SLEEP seconds after step 3 of every job (see
# test_tokens_per_sec_counts_the_train_steps_time_only); it changes no loss.
SLEEP = 1.0
SLEEP_PLUGIN = [
    "+callbacks.sleep._target_=callbacks_for_tests.SleepAt",
    "+callbacks.sleep.at=3",
    f"+callbacks.sleep.seconds={SLEEP}",
]


@pytest.fixture(scope="module")
def basic_sweep(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """One sweep of four jobs in one process, two of which fail (seq_len 999 > the model's)."""
    sweep = tmp_path_factory.mktemp("sweep")
    proc = _nnxtrain(
        "-m",
        *TINY,
        *SLEEP_PLUGIN,
        "run.seq_len=999,16",
        "optim.lr=0.001,0.003",
        f"hydra.sweep.dir={sweep}",
    )
    return sweep, proc


def _job(sweep: Path, *overrides: str) -> int:
    """The number of the sweep's job run with these overrides."""
    return next(i for i in range(4) if set(overrides) <= set(_status(sweep / str(i))["overrides"]))


def test_failed_jobs_do_not_stop_the_sweep(
    basic_sweep: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    sweep, proc = basic_sweep
    # Every job ran; the sweep's exit code and last line say that two failed.
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"nnxtrain: 2 of 4 jobs failed (see {sweep / 'summary.csv'})"
    )
    statuses = [_status(sweep / str(i)) for i in range(4)]
    failed = [s for s in statuses if s["status"] == "failed"]
    done = [s for s in statuses if s["status"] == "completed"]
    assert len(failed) == 2 and len(done) == 2
    for s in failed:
        assert "run.seq_len" in s["error"] and "\n" not in s["error"]
    # Every job ran in the one process of the basic launcher.
    assert len({s["pid"] for s in statuses}) == 1


def test_summary_files(basic_sweep: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    sweep, proc = basic_sweep
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert [r["job"] for r in rows] == ["0", "1", "2", "3"]
    assert {r["status"] for r in rows} == {"completed", "failed"}
    for r in rows:
        if r["status"] == "completed":
            assert float(r["final_loss"]) > 0 and float(r["best_eval_loss"]) > 0
            assert float(r["tokens_per_sec"]) > 0 and float(r["wall_seconds"]) > 0
            assert r["overrides"] in {
                "run.seq_len=16 optim.lr=0.001",
                "run.seq_len=16 optim.lr=0.003",
            }
    assert json.loads((sweep / "summary.json").read_text())[0]["job"] == 0
    assert (sweep / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "sweep summary" in proc.stdout


def test_sequential_jobs_match_fresh_runs(
    basic_sweep: tuple[Path, subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    sweep, _ = basic_sweep
    # That job (seq_len=16, lr=0.003) ran last, after three others in the same process.
    job = _job(sweep, "run.seq_len=16", "optim.lr=0.003")
    fresh = run_cli_in_process([*TINY, "optim.lr=0.003", f"hydra.run.dir={tmp_path}"], tmp_path)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert _losses(sweep / str(job)) == _losses(tmp_path)


def test_tokens_per_sec_counts_the_train_steps_time_only(
    basic_sweep: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    """The summary's tokens/s is the job's non-padding tokens over the device's time on its
    train steps after the first (whose time holds the compiled program's one-time start):
    not compilation, evaluation (after steps 4 and 8) or a plugin holding the host for
    `sleep` seconds after step 3 (the device idles)."""
    sweep, _ = basic_sweep
    sleep = SLEEP
    job = _job(sweep, "run.seq_len=16", "optim.lr=0.001")
    row = json.loads((sweep / "summary.json").read_text())[job]
    assert row["job"] == job
    status = _status(sweep / str(job))
    # The same floats through JSON: equal to rounding.
    tokens, timed = status["timed_tokens"], status["timed_seconds"]
    assert row["tokens_per_sec"] == pytest.approx(tokens / timed, rel=1e-12)
    assert tokens == 7 * 4 * 16  # steps 2-8, 4 x 16 targets each, none padding
    # metrics.jsonl, a line a step: each line's seconds run from the step before's
    # completion (the first: from its dispatch, after compilation) to its own, so those of
    # steps 2-8 add up to their span, the sleep and the evaluations included.
    lines = (sweep / str(job) / "metrics.jsonl").read_text().splitlines()
    seconds = {r["step"]: r["seconds"] for r in map(json.loads, lines) if "loss" in r}
    assert sorted(seconds) == list(range(1, 9))
    span = sum(seconds[s] for s in range(2, 9))
    assert 0 < timed <= span
    # The device was idle during the sleep but for steps 2 and 3 (at most two in flight),
    # so the step time leaves out at least `sleep` less their seconds.
    assert timed <= span - sleep + seconds[2] + seconds[3]
    assert row["tokens_per_sec"] >= tokens / span


def test_unknown_override_in_a_sweep_is_one_line(tmp_path: Path) -> None:
    proc = run_cli_in_process(
        ["-m", *TINY, "optim.lrr=1e-3,3e-3", f"hydra.sweep.dir={tmp_path}"], tmp_path
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "optim.lrr" in proc.stderr


def test_optuna_search_with_a_tiny_budget_on_submitit_processes(tmp_path: Path) -> None:
    """The Optuna sweeper picks the trials and the submitit launcher runs each as its own
    process (one sweep for both plugins: their combination is what a cluster user runs)."""
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("nnxtrain")),
            "+hparams_search=optuna_lr",
            "hydra/launcher=local_jax",
            *TINY,
            "hydra.sweeper.n_trials=2",
            f"hydra.sweep.dir={tmp_path}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    pids = {_status(tmp_path / str(i))["pid"] for i in range(2)}
    assert len(pids) == 2 and proc.pid not in pids
    results = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    assert set(results["best_params"]) == {"optim.lr", "optim.warmup_steps"}
    rows = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert len(rows) == 2 and all(r["status"] == "completed" for r in rows)
    # The sweeper minimised what each job returned (through submitit): its final eval loss.
    best = min(float(r["final_eval_loss"]) for r in rows)
    assert results["best_value"] == pytest.approx(best, rel=1e-6)


def test_in_process_runs_leak_nothing(tmp_path: Path) -> None:
    script = f"""
import gc, signal, threading, jax
from nnxtrain import Trainer, compose
def run(i):
    cfg = compose({TINY[:-1]!r} + ["callbacks=none", "run.dir={tmp_path}/r" + str(i)])
    return Trainer(cfg).fit().metrics["loss"]
handlers = (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT))
first = run(0); gc.collect()
arrays, threads = len(jax.live_arrays()), threading.active_count()
second = run(1); gc.collect()
assert first == second, (first, second)
assert len(jax.live_arrays()) == arrays, (len(jax.live_arrays()), arrays)
assert threading.active_count() == threads, (threading.active_count(), threads)
assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers
print("OK")
"""
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ},
    )
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]
