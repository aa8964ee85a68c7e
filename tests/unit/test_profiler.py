"""The profiler: a trace of exactly the requested steps, stopped however the run ends."""

import gzip
import io
import json
import types
from pathlib import Path
from typing import Any

import jax
import pytest
from callbacks_for_tests import RaiseAt, StopAt
from nnxtrain.plugins.profiler import Profiler
from rich.console import Console

from nnxtrain import (
    Callback,
    ConfigError,
    PluginError,
    SetupEvent,
    Trainer,
    TrainStartEvent,
    compose,
)

# The same compiled step as tests/unit/test_early_stopping.py (the session cache reuses it).
BASE = ["model=tiny", "run.steps=12", "run.batch_size=4", "run.seq_len=16"]
BASE += ["callbacks=none", "optim.warmup_steps=2", "run.eval_every=0"]


def fit(tmp_path: Path, callbacks: list[Callback]) -> tuple[Any, str]:
    out = io.StringIO()
    trainer = Trainer(
        compose([*BASE, f"run.dir={tmp_path}"]),
        callbacks,
        console=Console(file=out, soft_wrap=True),
    )
    try:
        return trainer.fit(), out.getvalue()
    except PluginError as e:
        return e, out.getvalue()


def trace_files(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "profile").rglob("*.trace.json.gz"))


def executions(trace: Path) -> int:
    """Runs of a compiled program recorded in a CPU trace (each traced step is one)."""
    events = json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]
    return sum("ExecuteHelper" in e.get("name", "") for e in events if e.get("ph") == "X")


def assert_no_trace_running(tmp_path: Path) -> None:
    jax.profiler.start_trace(str(tmp_path / "probe"))  # raises if a trace still runs
    jax.profiler.stop_trace()


def test_traces_exactly_the_requested_steps(tmp_path: Path) -> None:
    result, console = fit(tmp_path, [Profiler(start_step=3, num_steps=2)])
    assert result.reason == "completed"
    assert f"profiler: traced steps 3-4 into {tmp_path / 'profile'}" in console
    (trace,) = trace_files(tmp_path)
    assert list(trace.parent.glob("*.xplane.pb"))  # TensorBoard / XProf's format too
    assert executions(trace) == 2  # steps 3 and 4: none before, none after
    assert_no_trace_running(tmp_path)


def test_a_stop_request_ends_the_trace_early(tmp_path: Path) -> None:
    result, console = fit(tmp_path, [Profiler(start_step=2, num_steps=20), StopAt(at=3)])
    assert result.step == 3 and result.reason.startswith("stopped:")
    assert "profiler: traced steps 2-3" in console
    assert len(trace_files(tmp_path)) == 1
    assert_no_trace_running(tmp_path)


def test_an_exception_stops_the_trace_in_teardown(tmp_path: Path) -> None:
    boom = RaiseAt(at=3)
    boom.name = "boom"
    error, console = fit(tmp_path, [Profiler(start_step=2, num_steps=20), boom])
    assert isinstance(error, PluginError)  # the hook's error names the plugin and the hook
    assert str(error) == (
        "callback 'boom' (RaiseAt) raised in on_step_end: RuntimeError: boom at step 3. "
        f"Fix: correct the plugin (its traceback is in {tmp_path / 'errors.log'})."
    )
    assert "profiler: traced steps 2-3" in console
    assert len(trace_files(tmp_path)) == 1
    assert_no_trace_running(tmp_path)


def test_a_resumed_run_past_the_window_traces_nothing(tmp_path: Path) -> None:
    prof = Profiler(start_step=5)
    stub: Any = types.SimpleNamespace()
    prof.on_setup(stub, SetupEvent(compose(BASE), stub, stub, stub, str(tmp_path), None))
    prof.on_train_start(stub, TrainStartEvent(step=10, num_steps=20))
    prof.teardown(stub)
    assert not (tmp_path / "profile").exists()


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"start_step": 0}, "start_step"),
        ({"num_steps": 0}, "num_steps"),
        ({"directory": ""}, "directory"),
    ],
)
def test_bad_option_is_one_line_naming_the_key(options: dict[str, Any], key: str) -> None:
    prof = Profiler(**options)
    prof.name = "prof"
    stub: Any = types.SimpleNamespace()
    with pytest.raises(ConfigError) as err:
        prof.on_setup(stub, SetupEvent(compose(BASE), stub, stub, stub, "/nonexistent", None))
    assert str(err.value).startswith(f"callbacks.prof.{key}: ") and "\n" not in str(err.value)


def test_a_directory_that_is_a_file_is_found_at_setup(tmp_path: Path) -> None:
    (tmp_path / "trace").write_text("")
    prof = Profiler(directory="trace")
    prof.name = "prof"
    stub: Any = types.SimpleNamespace()
    with pytest.raises(ConfigError, match=r"^callbacks\.prof\.directory: .* is a file"):
        prof.on_setup(stub, SetupEvent(compose(BASE), stub, stub, stub, str(tmp_path), None))
