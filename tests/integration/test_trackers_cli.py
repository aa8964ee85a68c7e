"""The tracker plugins through the real CLI: a required tracker that cannot connect exits 2
in one line, before anything is saved; the check of a 2-job multirun (one MLflow experiment
and one W&B group, each job tagged with its number and swept value), which
tests/integration/test_wheel.py runs from the installed wheel. No network."""

import os
from pathlib import Path

import pytest
from conftest import cli_env, run_cli
from tracker_records import history, mlflow_runs, wandb_runs

pytestmark = pytest.mark.slow

TINY = [
    "model=tiny",
    "run.steps=4",
    "run.batch_size=4",
    "run.seq_len=16",
    "run.log_every=2",
    "run.eval_every=0",
]


def offline_env(tmp_path: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """`base` (the CLI's test environment by default) with W&B offline, its files and
    MLflow's store under tmp_path's tree (MLflow's default store: mlflow.db in the cwd)."""
    env = (base or cli_env()) | {"WANDB_MODE": "offline", "WANDB_PROJECT": "nnxtrain-tests"}
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        env[var] = str(tmp_path / "home" / var.lower())
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_DIR", "WANDB_RUN_GROUP"):
        env.pop(var, None)
    return env


# The sweep the tracker loggers are checked on runs from the installed wheel
# (tests/integration/test_wheel.py): joblib's two jobs at once, in two processes, both
# opening one new MLflow store and attaching to one experiment (mlflow_logger's lock).
# Two tracker runs in one process, one after the other: tests/unit/test_trackers.py.
def check_one_experiment_and_one_group(sweep: Path, uri: str) -> None:
    """A 2-job sweep of TINY over optim.lr=0.001,0.003 is one MLflow experiment (in the
    store at `uri`) and one W&B group, each job tagged with its number and swept value."""
    # Jobs may run in parallel (joblib): their runs are taken in job order, not start order.
    runs = sorted(mlflow_runs(uri), key=lambda r: int(r.data.tags["nnxtrain.job"]))
    assert len(runs) == 2
    assert {r.info.experiment_id for r in runs} == {runs[0].info.experiment_id}  # one
    from mlflow.tracking import MlflowClient

    experiment = MlflowClient(tracking_uri=uri).get_experiment(runs[0].info.experiment_id)
    assert experiment.name == f"nnxtrain sweep {sweep}"
    for job, (run, lr) in enumerate(zip(runs, ("0.001", "0.003"), strict=True)):
        print(
            f"MLflow job {run.data.tags['nnxtrain.job']}: {run.info.run_name}, "
            f"optim.lr={run.data.params['optim.lr']}, experiment {experiment.name!r}, "
            f"train/loss {history(uri, run.info.run_id, 'train/loss')}"
        )
        assert run.data.tags["nnxtrain.job"] == str(job)
        assert run.data.tags["nnxtrain.sweep_dir"] == str(sweep)
        assert run.data.params["sweep.optim.lr"] == lr and run.data.params["optim.lr"] == lr
        assert sorted(history(uri, run.info.run_id, "train/loss")) == [2, 4]

    wandb = [r for job in ("0", "1") for r in wandb_runs(sweep / job / "wandb")]
    for job, (run, lr) in enumerate(zip(wandb, (0.001, 0.003), strict=True)):
        print(
            f"W&B job {run.config['sweep.job']}: {run.name!r}, group {run.group!r}, "
            f"history steps {sorted(run.history)}"
        )
        assert run.group == str(sweep)  # one group per sweep
        assert run.config["sweep.job"] == job and run.config["optim.lr"] == lr
        assert run.config["sweep.optim.lr"] == str(lr)  # the override, as typed
        assert sorted(run.history) == [2, 4] and run.exit_code == 0


def test_a_required_tracker_that_cannot_connect_exits_2_in_one_line(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run_cli(
        [
            *TINY,
            f"run.dir={run_dir}",
            "+callbacks.mlflow._target_=mlflow_logger",
            "+callbacks.mlflow.tracking_uri=bogus://nowhere",
            "+callbacks.mlflow.required=true",
        ],
        cwd=tmp_path,
        env=offline_env(tmp_path),
    )
    print(proc.stderr)
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(
        "nnxtrain: error: callbacks.mlflow.required: is true and MLflow could not set up"
    ), line
    assert line.endswith("or set callbacks.mlflow.required=false to train without it."), line
    # It stopped in on_setup: nothing compiled, trained or saved (the checkpointer, set up
    # before it, made its folder and locked it, and left it empty).
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == [".lock"]
    assert not (run_dir / "config.yaml").exists() and not (run_dir / "metrics.jsonl").exists()
    assert not os.path.exists(tmp_path / "mlflow.db")
