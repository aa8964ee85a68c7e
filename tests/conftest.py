"""Shared test set-up: tiny configs, a JAX compilation cache, and a CLI runner.

- `tests/` is put on `sys.path` so that `callbacks_for_tests` (plugins the tests load by
  dotted path, in-process and in CLI subprocesses) imports as a top-level module.
- A session-wide persistent compilation cache in a fresh temporary directory: the many
  small `Trainer` runs compile the same step, and XLA on CPU takes seconds per compile.
  The trainer points JAX at `run.compile_cache` (default: under the home directory), so
  tests pass `compile_cache_override()` to keep the cache inside the session's tmp dir.
- `run_cli(args, cwd)` runs `python -m nnxtrain.cli` in a subprocess, from a directory
  that is not the repository, so nothing depends on the working directory.
"""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import pytest

from nnxtrain.config import ModelConfig

# Every run the tests start (in-process or as a CLI subprocess) keeps its default compilation
# cache ($XDG_CACHE_HOME/nnxtrain/jax) out of the user's home directory.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="nnxtrain-test-cache-")

# In-process runs share one JAX: pin its CPU device count, so that no test depends on which
# test started JAX first (`run.host_devices=-1` keeps the devices of a JAX that runs).
jax.config.update("jax_num_cpu_devices", 1)

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

# A model small enough that every forward/backward in the unit tests is instant, with
# grouped-query attention (4 query heads share 2 kv heads) and two stacked layers.
TINY = ModelConfig(
    name="unit",
    vocab_size=32,
    emb_dim=16,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    mlp_dim=24,
    max_len=32,
    dtype="float32",
)


_CACHE: list[Path] = []  # the session's compilation cache directory, once created


@pytest.fixture(scope="session", autouse=True)
def _compilation_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Caches compiled programs for this session only (identical steps compile once)."""
    _CACHE.append(tmp_path_factory.mktemp("jax_cache"))
    jax.config.update("jax_compilation_cache_dir", str(_CACHE[0]))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def compile_cache_override() -> str:
    """`run.compile_cache=<the session's cache>`: no test writes outside its tmp dirs."""
    assert _CACHE, "the session fixture has not run yet"
    return f"run.compile_cache={_CACHE[0]}"


def cli_env() -> dict[str, str]:
    """The environment for CLI subprocesses: test plugins importable, quiet JAX."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS_DIR), env.get("PYTHONPATH", "")) if p)
    env.pop("XLA_FLAGS", None)
    env["JAX_PLATFORMS"] = "cpu"
    return env


def run_cli(
    args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Runs the real `nnxtrain` CLI (`python -m nnxtrain.cli ARGS`) in `cwd`."""
    if not any(a.startswith("run.compile_cache=") for a in args):
        args = [*args, compile_cache_override()]
    return subprocess.run(
        [sys.executable, "-m", "nnxtrain.cli", *args],
        cwd=cwd,
        env=env or cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def shardings_table(text: str) -> dict[str, list[str]]:
    """First cell -> cells of every table row of a shardings.txt (the sharding printer's)."""
    out = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.split("│")]
        if len(cells) >= 4 and cells[0] not in ("path", "name"):
            out[cells[0]] = cells
    return out
