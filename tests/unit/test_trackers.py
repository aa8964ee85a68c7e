"""The tracker plugins, read back with each tool's own formats: MLflow's local store through
`MlflowClient`, W&B's offline run file through its protobuf records. No network.

Each run is 6 tiny steps logged every 2, evaluated at steps 3 and 6, beside the metrics
logger, whose metrics.jsonl is what the trackers must agree with.
"""

import io
import json
import os
import signal
import socket
import sys
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port
from nnxtrain.plugins._tracking import Tracker
from nnxtrain.plugins.metrics_logger import MetricsLogger
from nnxtrain.plugins.mlflow_logger import MlflowLogger
from nnxtrain.plugins.wandb_logger import WandbLogger
from rich.console import Console
from tracker_records import history, mlflow_runs, wandb_runs

from nnxtrain import ConfigError, Trainer, compose
from nnxtrain.parallel.preemption import Interrupted, Preemption

BASE = [
    "model=tiny",
    "run.steps=6",
    "run.batch_size=4",
    "run.seq_len=16",
    "run.log_every=2",
    "run.eval_every=3",
    "run.eval_batches=1",
    "callbacks=none",
]


@pytest.fixture(autouse=True)
def _tools_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Neither tool reads or writes the user's settings, nor reaches a server."""
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_DIR", "WANDB_RUN_GROUP"):
        monkeypatch.delenv(var, raising=False)
    home = tmp_path / "home"
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(home / var.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_PROJECT", "nnxtrain-tests")
    monkeypatch.chdir(tmp_path)  # MLflow's default store lands in the working directory


def fit(run_dir: Path, tracker: Tracker, *overrides: str) -> Any:
    tracker.name = "tracker"
    logger = MetricsLogger(log_every=2, tensorboard=False, progress=False)
    logger.name = "metrics"
    config = compose([*BASE, f"run.dir={run_dir}", *overrides])
    return Trainer(config, [logger, tracker]).fit()


def jsonl(run_dir: Path) -> tuple[dict[int, float], dict[int, float]]:
    """Train and eval loss by step, from the metrics logger's records."""
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r["loss"] for r in records if "loss" in r}
    evals = {r["step"]: r["eval/loss"] for r in records if "eval/loss" in r}
    return train, evals


def test_mlflow_logs_config_metrics_and_run_info(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = fit(run_dir, MlflowLogger(), "optim.lr=0.002")
    assert result.reason == "completed"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # MLflow's default: the working directory
    (run,) = mlflow_runs(uri)
    run_id = run.info.run_id
    print(f"MLflow run {run_id}: status {run.info.status}, {len(run.data.params)} params")
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["optim.lr"] == "0.002" and params["model.name"] == "tiny"
    assert params["run.steps"] == "6" and params["run.log_every"] == "2"
    assert params["mesh.rules"] == "{}"  # an empty mapping keeps its key; values as JSON
    assert run.data.tags["nnxtrain.run_dir"] == str(run_dir)
    train, evals = jsonl(run_dir)
    assert sorted(train) == [2, 4, 6] and sorted(evals) == [3, 6]
    # The same float32 values, fetched once and passed on as Python floats: exact.
    logged_train = history(uri, run_id, "train/loss")
    logged_eval = history(uri, run_id, "eval/loss")
    print("train/loss by step:", logged_train, "\neval/loss by step:", logged_eval)
    assert logged_train == train and logged_eval == evals
    assert sorted(history(uri, run_id, "train/grad_norm")) == [2, 4, 6]
    assert sorted(history(uri, run_id, "train/seconds_per_step")) == [4, 6]  # needs a previous
    assert history(uri, run_id, "run_info.final.step") == {6: 6.0}
    from mlflow.tracking import MlflowClient

    local = MlflowClient(tracking_uri=uri).download_artifacts(
        run_id, "run_info.json", str(tmp_path)
    )
    saved = json.loads(Path(local).read_text())
    on_disk = json.loads((run_dir / "run_info.json").read_text())
    # The goodput account goes on after on_train_end (the teardown, the last write): the
    # logged copy holds it as it stood then, with the same buckets, and less wall time.
    logged_goodput, final_goodput = saved.pop("goodput"), on_disk.pop("goodput")
    assert saved == on_disk
    assert set(logged_goodput["seconds"]) == set(final_goodput["seconds"])
    assert 0 < logged_goodput["wall_seconds"] <= final_goodput["wall_seconds"]
    assert history(uri, run_id, "run_info.goodput.wall_seconds")  # the account's values, ...
    assert not history(uri, run_id, "run_info.goodput.step_seconds.1")  # not its ledger
    assert saved["final"]["reason"] == "completed"


def test_wandb_offline_run_holds_config_metrics_and_run_info(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert fit(run_dir, WandbLogger(), "optim.lr=0.002").reason == "completed"
    (run,) = wandb_runs(run_dir / "wandb")  # W&B's files go under the run dir
    print(
        f"W&B offline run: project {run.project}, {len(run.config)} config keys, "
        f"history steps {sorted(run.history)}, files {run.files}, exit {run.exit_code}"
    )
    assert run.project == "nnxtrain-tests"  # WANDB_PROJECT
    assert run.config["optim.lr"] == 0.002 and run.config["model.name"] == "tiny"
    assert run.config["run.steps"] == 6
    train, evals = jsonl(run_dir)
    assert {s: h["train/loss"] for s, h in run.history.items() if "train/loss" in h} == train
    assert {s: h["eval/loss"] for s, h in run.history.items() if "eval/loss" in h} == evals
    assert run.summary["run_info.final.step"] == 6
    assert run.summary["run_info.final.reason"] == "completed"
    assert run.summary["status"] == "completed"
    assert "run_info.json" in run.files and run.exit_code == 0


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda: WandbLogger(), "W&B is not installed"),
        (lambda: MlflowLogger(tracking_uri="bogus://nowhere"), "MLflow could not set up"),
    ],
    ids=["wandb-missing", "mlflow-bad-uri"],
)
def test_a_failing_tracker_warns_once_and_the_run_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], make, says
) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: import fails
    result = fit(tmp_path / "run", make())
    assert result.reason == "completed" and result.step == 6
    warnings = [x for x in capsys.readouterr().out.splitlines() if x.startswith("warning:")]
    print(warnings)
    assert len(warnings) == 1 and says in warnings[0], warnings
    assert "callbacks.tracker.required=true makes this fatal" in warnings[0]


def test_a_required_tracker_that_fails_stops_the_run_before_anything_is_saved(
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError) as e:
        fit(run_dir, MlflowLogger(tracking_uri="bogus://nowhere", required=True))
    print(e.value)
    assert e.value.key == "callbacks.tracker.required"
    assert "set callbacks.tracker.required=false" in str(e.value)
    assert len(str(e.value).splitlines()) == 1
    assert not (run_dir / "config.yaml").exists() and not (run_dir / "metrics.jsonl").exists()


def test_a_bad_every_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"callbacks.tracker.every: must be an integer >= 0"):
        fit(tmp_path / "run", MlflowLogger(every=-1))


def test_a_resumed_run_continues_the_same_mlflow_run(tmp_path: Path) -> None:
    from nnxtrain.plugins.checkpointer import Checkpointer

    def run(steps: int) -> None:
        checkpointer, tracker = Checkpointer(every=2), MlflowLogger()
        checkpointer.name, tracker.name = "checkpoint", "tracker"
        config = compose([*BASE, f"run.dir={tmp_path / 'run'}", f"run.steps={steps}"])
        assert Trainer(config, [checkpointer, tracker]).fit().reason == "completed"

    run(4)
    run(6)  # restores step 4, and with it the tracker's run id
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (only,) = mlflow_runs(uri)
    logged = history(uri, only.info.run_id, "train/loss")
    print(f"one MLflow run {only.info.run_id} across the resume: train/loss steps {sorted(logged)}")
    assert sorted(logged) == [2, 4, 6] and only.info.status == "FINISHED"
    assert only.data.params["run.steps"] == "4"  # MLflow params keep their first value


# -- a server that does not answer ----------------------------------------------------------


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A tracking URI on 127.0.0.1 whose server accepts connections (the kernel's backlog
    does) and never answers."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        yield f"http://127.0.0.1:{server.getsockname()[1]}"


@pytest.mark.parametrize(
    ("server", "options", "sigterm", "says"),
    [
        ("refuses", {"timeout": 0.5}, False, "no answer within 0.5 s"),
        ("never answers", {"timeout": 0.5, "required": True}, False, "no answer within 0.5 s"),
        ("never answers", {"timeout": 600}, True, "interrupted"),
    ],
    ids=["refused-warns", "silent-required-fails", "sigterm-ends-the-wait"],
)
def test_an_unreachable_tracking_server_is_given_up_on_in_one_line(
    tmp_path: Path, silent_server: str, server: str, options: Any, sigterm: bool, says: str
) -> None:
    uri = silent_server if server == "never answers" else f"http://127.0.0.1:{free_port()}"
    tracker = MlflowLogger(tracking_uri=uri, **options)
    tracker.name = "tracker"
    out = io.StringIO()
    trainer = types.SimpleNamespace(console=Console(file=out, width=1000))
    event = types.SimpleNamespace(config=compose(BASE), run_dir=str(tmp_path))
    preemption = Preemption()  # the trainer's handler, as fit() installs it
    preemption.install()
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM))
    error: ConfigError | Interrupted | None = None
    t0 = time.monotonic()
    try:
        if sigterm:
            timer.start()
        tracker.on_setup(trainer, event)  # type: ignore[arg-type]
    except (ConfigError, Interrupted) as e:
        error = e
    finally:
        timer.cancel()
        if sigterm:
            timer.join()  # the signal, if sent, is sent while the handler is installed
        preemption.uninstall()
    seconds = time.monotonic() - t0
    print(f"{server}, {options}: {seconds:.1f} s; {error or out.getvalue()}")
    # Generous: without a bound, MLflow retries a refused connection for minutes (248 s),
    # and a server that never answers for longer (> 330 s).
    assert seconds < 30
    if sigterm:  # during set-up, a signal ends the run at once, the tracker's wait too
        assert isinstance(error, Interrupted) and error.signal == "SIGTERM"
    elif options.get("required"):
        assert error is not None and error.key == "callbacks.tracker.required"
        (line,) = str(error).splitlines()
        assert f"MLflow could not set up ({says})" in line and "callbacks.tracker.timeout" in line
    else:
        assert error is None
        (line,) = out.getvalue().splitlines()
        assert line.startswith(f"warning: callbacks.tracker: MLflow could not set up ({says})")
        assert "training goes on without it" in line
    # The signal reached the run's own handler too (which stops the run at its next step).
    assert preemption.signal == ("SIGTERM" if sigterm else None)


def test_a_required_wandb_without_an_api_key_fails_before_anything_is_compiled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WANDB_MODE")  # online
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc, no stored key
    monkeypatch.setenv("NETRC", str(tmp_path / "home" / ".netrc"))
    tracker = WandbLogger(required=True)
    tracker.name = "tracker"
    trainer = Trainer(compose([*BASE, f"run.dir={tmp_path / 'run'}"]), [tracker])
    with pytest.raises(ConfigError) as e:
        trainer.fit()
    print(e.value)
    assert e.value.key == "callbacks.tracker.required"
    (line,) = str(e.value).splitlines()
    assert "W&B could not set up (RuntimeError: no API key" in line
    assert trainer.compiled is None  # it failed in on_setup, before the compile
    assert not (tmp_path / "run" / "config.yaml").exists()


class Captured(Tracker):
    """A tracker whose tool is a list: what `log` was given, call by call."""

    def __init__(self) -> None:
        super().__init__(every=1)
        self.logged: list[dict[str, float]] = []
        self._active = self._started = True

    def remote(self) -> bool:
        return False

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.logged.append(metrics)


def test_a_step_or_evaluation_without_loss_tokens_logs_no_loss() -> None:
    """Loss 0 and perplexity 1 over no token are no measurement: left out, not logged."""
    from nnxtrain import METRIC_NAMES, EvalEndEvent, StepEndEvent

    tracker, view = Captured(), types.SimpleNamespace(console=None)
    for weights in (5.0, 0.0):
        metrics = dict.fromkeys(METRIC_NAMES, 0.0) | {"total_weights": weights}
        record = types.SimpleNamespace(metrics=metrics, completed_at=1.0)
        tracker.on_step_end(view, StepEndEvent(1, 2, 8, None, lambda r=record: r))  # type: ignore[arg-type]
    evaluation = {"eval/loss": 0.0, "eval/perplexity": 1.0, "eval/total_weights": 0.0}
    tracker.on_eval_end(view, EvalEndEvent(2, evaluation, 1, 0.1))  # type: ignore[arg-type]
    full, empty, evaluated = tracker.logged
    assert {"train/loss", "train/perplexity"} <= full.keys()
    assert not {"train/loss", "train/lm_loss", "train/z_loss", "train/perplexity"} & empty.keys()
    assert empty["train/total_weights"] == 0.0 and evaluated == {"eval/total_weights": 0.0}
