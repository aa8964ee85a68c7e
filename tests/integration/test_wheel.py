"""The built wheel, installed (not editable) in a fresh venv, holds and runs every config.

One module fixture copies the tracked files to a temporary directory, builds the wheel
there (`pip wheel --no-deps --no-build-isolation`: offline, with the setuptools of the dev
extra; a copy, so no `build/` folder in the checkout can leak stale files into it) and
installs it into a fresh venv. The commands then run from a directory outside the checkout.

Dependencies: the fresh venv installs only the wheel (`--no-deps`) and reaches the
dependencies already installed for this interpreter through a `.pth` path entry, appended
after its own site-packages. A real `pip install` of the wheel with its dependencies took
about 24 s (warm pip cache, 2 cores, load 5) against about 1 s for this, and it needs the
package index; what this test is about is what the wheel holds, not dependency resolution.
Python does not read the `.pth` files of a directory added that way, so the editable
install's import hook in the dev venv stays off; the fixture proves `nnxtrain` imports
from the fresh venv.
"""

import configparser
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import compile_cache_override
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from test_trackers_cli import TINY, check_one_experiment_and_one_group, offline_env

from nnxtrain.config import register_schemas

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
# Where each top-level folder of the checkout lands inside the wheel.
INSTALLED_AS = {"conf": "nnxtrain/conf", "plugins": "nnxtrain/plugins"}


@dataclass(frozen=True)
class Installed:
    wheel: Path
    venv: Path
    conf: Path  # nnxtrain/conf inside the fresh venv's site-packages
    workdir: Path  # outside the checkout
    env: dict[str, str]

    def run(self, command: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.venv / "bin" / command), *args],
            cwd=self.workdir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=300,
        )


def _tracked() -> list[str]:
    """The checkout's tracked files (those present), as a fresh clone would have them."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs a git checkout (builds the wheel from the tracked files)")
    out = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    return [p for p in out.split("\0") if p and (REPO / p).is_file()]


def _check(args: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    """Runs a set-up command; its stdout, or a failure that shows its stderr."""
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{args}:\n{proc.stderr[-3000:]}"
    return proc.stdout.strip()


def _groups(conf: Path) -> dict[str, list[str]]:
    """Config group ("hydra/launcher") -> its options, from the YAML files under `conf`."""
    groups: dict[str, list[str]] = {}
    for f in sorted(conf.rglob("*.yaml")):
        group = f.parent.relative_to(conf).as_posix()
        if group != ".":  # the root config.yaml is no group
            groups.setdefault(group, []).append(f.stem)
    return groups


def _dist_info(wheel: Path) -> str:
    """The wheel's metadata folder: nnxtrain-0.1.0.dist-info."""
    return "-".join(wheel.name.split("-")[:2]) + ".dist-info"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    for rel in _tracked():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, src / rel)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    build = ["wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-w"]
    _check([*pip, *build, str(tmp / "dist"), str(src)])
    (wheel,) = (tmp / "dist").glob("nnxtrain-*.whl")

    venv = tmp / "venv"
    _check([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = str(venv / "bin" / "python")
    _check([*pip, "--python", python, "install", "-q", "--no-deps", "--no-index", str(wheel)])
    site = _check([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"])
    ours = dict.fromkeys(sysconfig.get_path(k) for k in ("purelib", "platlib"))
    (Path(site) / "dependencies.pth").write_text("".join(f"{p}\n" for p in ours))

    workdir = tmp / "work"
    workdir.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # XLA_FLAGS: conftest's
    env.update(JAX_PLATFORMS="cpu", PYTHONNOUSERSITE="1")  # XDG_CACHE_HOME: conftest's tmp
    probe = _check(
        [python, "-c", "import nnxtrain.conf; print(nnxtrain.conf.__file__)"], workdir, env
    )
    conf = Path(probe).parent
    return Installed(wheel, venv, conf, workdir, env)


def test_nnxtrain_imports_from_the_fresh_venv(installed: Installed) -> None:
    code = (
        "import importlib.metadata as m, nnxtrain, nnxtrain.plugins.checkpointer as c;"
        "print(nnxtrain.__file__); print(c.__file__);"
        "print(m.distribution('nnxtrain').locate_file(''))"
    )
    out = _check(
        [str(installed.venv / "bin" / "python"), "-c", code], installed.workdir, installed.env
    ).split()
    for path in out:
        assert Path(path).resolve().is_relative_to(installed.venv.resolve()), out
    assert installed.conf.is_relative_to(installed.venv)


def test_wheel_holds_every_tracked_config_and_plugin_file(installed: Installed) -> None:
    names = set(zipfile.ZipFile(installed.wheel).namelist())
    expected = {
        f"{INSTALLED_AS[top]}/{rest}"
        for top, _, rest in (p.partition("/") for p in _tracked())
        if top in INSTALLED_AS
    }
    assert expected, "found no tracked files under conf/ or plugins/"
    assert expected <= names, sorted(expected - names)
    # Nothing but nnxtrain itself: no bare conf/, plugins/, nor examples/, tests/, bench/.
    assert {n.split("/")[0] for n in names} == {"nnxtrain", _dist_info(installed.wheel)}


def test_installed_config_groups_equal_the_checkout(installed: Installed) -> None:
    assert _groups(installed.conf) == _groups(REPO / "conf")


def _option_runs(installed: Installed) -> list[list[str]]:
    """Override lists that, between them, select every option of every group once.

    Run i takes the i-th option of each group that has one, so as many compositions as the
    largest group has options, not one per option.
    Groups outside the root defaults list are added with `+`; Hydra's own groups
    (hydra/...) are in Hydra's defaults.
    """
    groups = _groups(installed.conf)
    root = yaml.safe_load((installed.conf / "config.yaml").read_text())
    defaults = {next(iter(d)) for d in root["defaults"] if isinstance(d, dict)}
    runs: list[list[str]] = []
    for group, options in groups.items():
        plus = "" if group in defaults or group.startswith("hydra/") else "+"
        for i, option in enumerate(options):
            if i == len(runs):
                runs.append([])
            runs[i].append(f"{plus}{group}={option}")
    return runs


# Composes each override list with Hydra inside the fresh venv, from the installed
# `nnxtrain.conf` module, and prints them as one JSON list: one interpreter for all of them
# (the CLI's own `--cfg job` run of the first list covers the entry point).
_COMPOSE_ALL = """
import json, sys
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from nnxtrain.config import register_schemas
register_schemas()
out = []
for overrides in json.loads(sys.argv[1]):
    with initialize_config_module(config_module="nnxtrain.conf", version_base="1.3"):
        out.append(OmegaConf.to_container(compose("config", overrides=overrides)))
print(json.dumps(out))
"""


def test_every_config_option_composes_from_the_wheel(installed: Installed) -> None:
    register_schemas()
    runs = _option_runs(installed)
    assert runs, f"no config groups under {installed.conf}"
    cli = installed.run("nnxtrain", "--cfg", "job", *runs[0])
    assert cli.returncode == 0, (runs[0], cli.stderr[-3000:])
    composed = installed.run("python", "-c", _COMPOSE_ALL, json.dumps(runs))
    assert composed.returncode == 0, composed.stderr[-3000:]
    from_wheel = json.loads(composed.stdout)
    assert yaml.safe_load(cli.stdout) == from_wheel[0]
    for overrides, got in zip(runs, from_wheel, strict=True):
        # The installed configs compose to exactly what the checkout's conf/ composes to.
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            expected = OmegaConf.to_container(compose("config", overrides=overrides))
        assert got == expected, overrides
    GlobalHydra.instance().clear()


def test_a_joblib_sweep_logs_one_mlflow_experiment_and_one_wandb_group(
    installed: Installed,
) -> None:
    """The installed command's sweep: two jobs at once (our joblib_jax launcher config),
    the tracker plugins by their registered short names; test_trackers_cli checks them."""
    sweep = installed.workdir / "sweep"
    env = offline_env(installed.workdir, installed.env)
    args = ["-m", "hydra/launcher=joblib_jax", *TINY, "mesh=single", "~callbacks.checkpoint"]
    args += ["+callbacks.wandb._target_=wandb_logger", "+callbacks.mlflow._target_=mlflow_logger"]
    args += ["optim.lr=0.001,0.003", f"hydra.sweep.dir={sweep}", compile_cache_override()]
    proc = subprocess.run(
        [str(installed.venv / "bin" / "nnxtrain"), *args],
        cwd=installed.workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "warning:" not in proc.stdout, proc.stdout
    statuses = [json.loads((sweep / str(i) / "job_status.json").read_text()) for i in (0, 1)]
    assert [s["status"] for s in statuses] == ["completed", "completed"], statuses
    assert (sweep / "summary.csv").is_file()
    check_one_experiment_and_one_group(sweep, f"sqlite:///{installed.workdir / 'mlflow.db'}")


def test_plugin_catalog_lists_every_registered_plugin(installed: Installed) -> None:
    proc = installed.run("nnxtrain-plugins")
    assert proc.returncode == 0, proc.stderr[-3000:]
    entry_points = configparser.ConfigParser()
    with zipfile.ZipFile(installed.wheel) as z:
        entry_points.read_string(z.read(f"{_dist_info(installed.wheel)}/entry_points.txt").decode())
    registered = dict(entry_points["nnxtrain.callbacks"])
    assert registered
    lines = proc.stdout.splitlines()
    for name, target in registered.items():  # e.g. "checkpointer  (nnxtrain.plugins....)"
        assert any(line.startswith(name) and f"({target})" in line for line in lines), name
