"""MLflow logger: the run's config, metrics and run_info.json in an MLflow tracking store.

    pip install 'nnxtrain[mlflow]'
    nnxtrain +callbacks.mlflow._target_=mlflow_logger              # ./mlflow.db, ./mlruns
    MLFLOW_TRACKING_URI=http://mlflow:5000 nnxtrain +callbacks.mlflow._target_=mlflow_logger
    nnxtrain -m optim.lr=1e-3,3e-4 +callbacks.mlflow._target_=mlflow_logger  # one experiment

Off by default. MLflow's own settings apply: `MLFLOW_TRACKING_URI`, and
`MLFLOW_EXPERIMENT_NAME`; an option given here wins over its variable. Without a URI
the store is MLflow's own default, `sqlite:///mlflow.db` in the working directory (its
artifacts in `./mlruns`): MLflow 3 refuses a plain `file:` store unless
`MLFLOW_ALLOW_FILE_STORE=true`, and a store in the working directory (not in each run
dir) holds every job of a sweep, which is what `mlflow ui` run from there shows. The
experiment is `nnxtrain`, except in a multirun given no experiment: `nnxtrain sweep
<sweep dir>`, one experiment per sweep. The flattened config goes into the run's
params, the sweep's identity and the run dir into its tags, metrics into their
histories at their steps, run_info's numbers into metrics named `run_info.<key>` and the
file into the run's artifacts. What happens when MLflow fails is said in
`plugins/_tracking.py`, the base this shares with wandb_logger.
"""

import contextlib
import fcntl
import json
import os
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any

from nnxtrain.plugins._tracking import Tracker, flatten, numeric

# MLflow's limits: values of params (MLflow 3), and entries of one log_batch call.
PARAM_VALUE_LIMIT, BATCH_PARAMS, BATCH_METRICS = 6000, 100, 1000
STATUS = {"completed": "FINISHED", "preempted": "KILLED", "failed": "FAILED"}  # MLflow's words


class MlflowLogger(Tracker):
    """Logs the config, train/eval metrics and run_info.json to an MLflow tracking store."""

    tool, extra = "MLflow", "mlflow"

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment: str | None = None,
        run_name: str | None = None,
        every: int = 0,
        required: bool = False,
        timeout: float = 10.0,
    ):
        super().__init__(every=every, required=required, timeout=timeout)
        self.tracking_uri, self.experiment, self.run_name = tracking_uri, experiment, run_name
        self._mlflow: Any = None
        self._client: Any = None
        self._experiment_id = ""

    def load(self) -> None:
        import mlflow  # only now: nnxtrain never imports it otherwise
        import mlflow.tracking

        self._mlflow = mlflow
        # get_tracking_uri(): MLFLOW_TRACKING_URI, else MLflow's default store.
        self.uri = self.tracking_uri or mlflow.get_tracking_uri()

    def remote(self) -> bool:
        """A server, unless a SQLite file, a file: URI or a path (MLflow's local stores)."""
        scheme = urllib.parse.urlparse(self.uri).scheme
        path = not scheme and self.uri.startswith(("/", "."))
        return scheme not in ("sqlite", "file") and not path

    def connect(self) -> None:
        with _one_at_a_time(self.uri):
            self._client = self._mlflow.tracking.MlflowClient(tracking_uri=self.uri)
            self._experiment_id = self._experiment()

    def _experiment(self) -> str:
        """The id of the run's experiment, created when it is new."""
        client = self._client
        name = self.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "nnxtrain"
        if self.sweep is not None and not (
            self.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME")
        ):
            name = f"nnxtrain sweep {self.sweep['dir']}"
        found = client.get_experiment_by_name(name)  # also checks that the store answers
        if found is None:
            try:
                return str(client.create_experiment(name))
            except Exception:  # another job of the sweep, on another host, created it first
                found = client.get_experiment_by_name(name)
                if found is None:
                    raise
        return str(found.experiment_id)

    def start(self, params: dict[str, Any], resume: bool) -> str:
        from mlflow.entities import Param, RunTag

        client, tags = self._client, {"nnxtrain.run_dir": self.run_dir}
        if self.sweep is not None:
            tags |= {
                "nnxtrain.sweep_dir": self.sweep["dir"],
                "nnxtrain.job": str(self.sweep["job"]),
            }
        if resume and self.run_id is not None:
            run = client.get_run(self.run_id)
            client.update_run(run.info.run_id, status="RUNNING")
            have = run.data.params  # MLflow params cannot change: log only new keys
        else:
            name = self.run_name or os.path.basename(self.run_dir)
            if self.sweep is not None and self.run_name is None:
                name = f"job {self.sweep['job']}"
            run = client.create_run(self._experiment_id, run_name=name, tags=tags)
            have = {}
        run_id = run.info.run_id
        entries = [Param(k, _text(v)) for k, v in params.items() if k not in have]
        for i in range(0, len(entries), BATCH_PARAMS):
            client.log_batch(run_id, params=entries[i : i + BATCH_PARAMS])
        if resume:
            client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        self.where = f"{self.uri}, experiment id {self._experiment_id}"
        return str(run_id)

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        entries = [Metric(k, v, now, step) for k, v in metrics.items()]
        for i in range(0, len(entries), BATCH_METRICS):
            self._client.log_batch(self.run_id, metrics=entries[i : i + BATCH_METRICS])

    def finish(self, info: dict[str, Any], info_path: str | None, status: str) -> None:
        assert self.run_id is not None
        try:
            step = int(info.get("final", {}).get("step", 0))
            self.log(numeric(flatten(info, "run_info.")), step)
            if info_path is not None:
                self._client.log_artifact(self.run_id, info_path)
        finally:
            self._client.set_terminated(self.run_id, status=STATUS.get(status, "FAILED"))

    def fix(self) -> str:
        return (
            f"check callbacks.{self.name}.tracking_uri or MLFLOW_TRACKING_URI and that the "
            "store answers"
        )


@contextlib.contextmanager
def _one_at_a_time(uri: str) -> Iterator[None]:
    """Holds `<db>.lock` beside a SQLite store while the block runs: the jobs of a parallel
    sweep that open one new store at once would race to create its tables (MLflow does
    not guard that: "table ... already exists"), and to create the sweep's experiment."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    with open(uri.removeprefix("sqlite:///") + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _text(value: Any) -> str:
    """A param's value as MLflow stores it: text, lists as JSON, cut to MLflow's limit."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text[:PARAM_VALUE_LIMIT]
