"""W&B logger: the run's config, metrics and run_info.json in Weights & Biases.

    pip install 'nnxtrain[wandb]'
    nnxtrain +callbacks.wandb._target_=wandb_logger                      # WANDB_* settings
    WANDB_MODE=offline nnxtrain +callbacks.wandb._target_=wandb_logger   # no network: sync later
    nnxtrain -m optim.lr=1e-3,3e-4 +callbacks.wandb._target_=wandb_logger   # one group per sweep

Off by default. W&B's own settings apply: `WANDB_MODE` (online | offline | disabled),
`WANDB_PROJECT`, `WANDB_ENTITY`, `WANDB_DIR`, `WANDB_RUN_GROUP`, `WANDB_API_KEY`; an
option given here wins over its variable. Without `WANDB_DIR` W&B's files go under the
run dir (`<run.dir>/wandb`), beside the run's other records, rather than into the
working directory. Without a project anywhere the project is `nnxtrain`. In a multirun
the group is the sweep dir, so a sweep is one W&B group. What is logged, and what happens
when W&B fails, is said in `plugins/_tracking.py` (the base it shares with mlflow_logger):
the flattened config goes into the run's config, the metrics into its history at their
steps, run_info into its summary (as `run_info.<key>`) and the file into its files.
"""

import os
import shutil
from typing import Any

from nnxtrain.plugins._tracking import Tracker, flatten

GROUP_LIMIT = 128  # W&B refuses longer group names
OFFLINE_MODES = ("offline", "dryrun", "disabled")  # W&B's modes that need no API key


class WandbLogger(Tracker):
    """Logs the config, train/eval metrics and run_info.json to Weights & Biases."""

    tool, extra = "W&B", "wandb"

    def __init__(
        self,
        project: str | None = None,
        entity: str | None = None,
        group: str | None = None,
        run_name: str | None = None,
        mode: str | None = None,
        dir: str | None = None,
        every: int = 0,
        required: bool = False,
        timeout: float = 10.0,
    ):
        super().__init__(every=every, required=required, timeout=timeout)
        self.project, self.entity, self.group, self.run_name = project, entity, group, run_name
        self.mode, self.dir = mode, dir
        self._wandb: Any = None
        self._run: Any = None

    def load(self) -> None:
        import wandb  # only now: nnxtrain never imports it otherwise

        self._wandb = wandb

    def remote(self) -> bool:
        """Online; offline (files only) or disabled is local."""
        return not any(m in OFFLINE_MODES for m in (self.mode, os.environ.get("WANDB_MODE")))

    def connect(self) -> None:
        """Online, an API key must be there (W&B's own search: WANDB_API_KEY, its settings,
        ~/.netrc): found now, before anything is compiled, not at `wandb.init` after."""
        if not self.remote() or self._wandb.run is not None:
            return  # no key needed; or a run of this process's already logged in
        if not self._wandb.login(prompt=False, verify=False):
            raise RuntimeError(
                "no API key: WANDB_API_KEY is not set, and `wandb login` stored none"
            )

    def start(self, params: dict[str, Any], resume: bool) -> str:
        project = self.project or os.environ.get("WANDB_PROJECT") or "nnxtrain"
        group = self.group
        if group is None and self.sweep is not None:
            group = self.sweep["dir"][-GROUP_LIMIT:]
        name = self.run_name or os.path.basename(self.run_dir)
        if self.sweep is not None and self.run_name is None:
            name = f"job {self.sweep['job']}"  # its overrides are in the config: sweep.<key>
        # W&B reads WANDB_DIR itself; without it, its files belong with the run's.
        directory = self.dir or (None if os.environ.get("WANDB_DIR") else self.run_dir)
        self._run = self._wandb.init(
            project=project,
            entity=self.entity,
            group=group,
            name=name,
            mode=self.mode,  # None: WANDB_MODE, else online
            dir=directory,
            config=params,
            id=self.run_id if resume else None,
            resume="allow" if resume else None,
            # console="off": W&B would otherwise wrap this process's stdout and stderr.
            settings=self._wandb.Settings(console="off", silent=True),
        )
        mode = str(getattr(self._run.settings, "mode", None) or "online")
        where = self._run.dir if mode in ("offline", "disabled") else self._run.url
        self.where = f"project {project}, {mode}, {where}"
        return str(self._run.id)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._run.log(metrics, step=step)

    def finish(self, info: dict[str, Any], info_path: str | None, status: str) -> None:
        run, self._run = self._run, None
        try:
            run.summary.update(flatten(info, "run_info."))
            run.summary["status"] = status
            if info_path is not None:  # a copy, as it is now, in the run's files
                copy = shutil.copy(info_path, os.path.join(run.dir, os.path.basename(info_path)))
                run.save(copy, base_path=run.dir, policy="now")
            if status == "preempted":
                run.mark_preempting()  # W&B's word for a run that a rerun resumes
        finally:
            run.finish(exit_code=0 if status == "completed" else 1)

    def fix(self) -> str:
        return "check WANDB_API_KEY and the network, or run with WANDB_MODE=offline"
