"""Plugins and events through `Trainer` from Python: loading callbacks from config, the order
and sequence of hooks, stop requests, errors in plugins, non-finite losses and dry runs.

Every run uses the same tiny model, batch and step count so that the compiled step is
shared (see the compilation cache in conftest.py).
"""

import itertools
import json
import re
import types
from pathlib import Path

import callbacks_for_tests as cbt
import numpy as np
import pytest
from conftest import compile_cache_override
from nnxtrain.plugins.early_stopping import EarlyStopping
from nnxtrain.plugins.memstats import MemStats
from nnxtrain.plugins.metrics_logger import MetricsLogger
from nnxtrain.plugins.mlflow_logger import MlflowLogger
from nnxtrain.plugins.profiler import Profiler
from nnxtrain.plugins.sampler import Sampler
from nnxtrain.plugins.spike_guard import SpikeGuard
from nnxtrain.plugins.wandb_logger import WandbLogger

from nnxtrain import (
    CompileEvent,
    ExceptionEvent,
    SetupEvent,
    StepEndEvent,
    TrainEndEvent,
    Trainer,
    TrainStartEvent,
    compose,
)
from nnxtrain.data import SyntheticData
from nnxtrain.errors import ConfigError, PluginError
from nnxtrain.train.accounting import count_params, step_flops
from nnxtrain.train.registry import build_callbacks, registered

STEPS = 5
MOD = "callbacks_for_tests"


def config(run_dir: Path, *overrides: str):
    """model=tiny, 2 x 8 tokens, 5 steps, no eval, no default callbacks, plus `overrides`."""
    return compose(
        [
            "model=tiny",
            "run.batch_size=2",
            "run.seq_len=8",
            f"run.steps={STEPS}",
            "run.eval_every=0",
            "callbacks=none",
            f"run.dir={run_dir}",
            compile_cache_override(),
            *overrides,
        ]
    )


@pytest.fixture(autouse=True)
def _clear_log():
    cbt.LOG.clear()
    yield
    cbt.LOG.clear()


def calls(name: str) -> list[str]:
    return [hook for who, hook, _ in cbt.LOG if who == name]


def events(name: str, hook: str) -> list:
    return [event for who, h, event in cbt.LOG if who == name and h == hook]


# -- loading --------------------------------------------------------------------------


def test_callbacks_load_from_dotted_paths_in_config_order(tmp_path):
    cfg = config(
        tmp_path,
        f"+callbacks.zeta._target_={MOD}.Recorder",
        f"+callbacks.beta._target_={MOD}.StopAt",
        "+callbacks.beta.at=4",
        f"+callbacks.alpha._target_={MOD}.Recorder",
    )
    trainer = Trainer(cfg)
    assert [cb.name for cb in trainer.callbacks] == ["zeta", "beta", "alpha"]
    assert [type(cb) for cb in trainer.callbacks] == [cbt.Recorder, cbt.StopAt, cbt.Recorder]
    assert trainer.callbacks[1].at == 4


def test_metrics_logger_is_registered_under_its_short_name():
    assert "metrics_logger" in registered()
    (cb,) = build_callbacks({"m": {"_target_": "metrics_logger", "log_every": 2}})
    assert isinstance(cb, MetricsLogger)
    assert cb.name == "m" and cb.log_every == 2


def test_entry_point_plugin_runs(tmp_path):
    cfg = config(tmp_path, "+callbacks.log._target_=metrics_logger", "+callbacks.log.log_every=2")
    trainer = Trainer(cfg)
    assert isinstance(trainer.callbacks[0], MetricsLogger)
    result = trainer.fit()
    assert result.reason == "completed"
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [2, 4, 5]  # every 2 steps and the last


@pytest.mark.parametrize(
    ("target", "match"),
    [
        ("no.such.Module", "cannot import"),
        ("nnxtrain.NoSuchClass", "cannot import"),
        ("no_such_short_name", "no plugin registered"),
        ("collections.OrderedDict", "not a subclass"),
    ],
)
def test_bad_target_raises_plugin_error_naming_the_key(target, match):
    with pytest.raises(PluginError, match=match) as err:
        build_callbacks({"x": {"_target_": target}})
    assert str(err.value).startswith("callbacks.x._target_: ")


def test_bad_target_in_config_fails_when_the_trainer_is_built(tmp_path):
    cfg = config(tmp_path, "+callbacks.x._target_=no.such.Module")
    with pytest.raises(PluginError, match=r"^callbacks\.x\._target_: "):
        Trainer(cfg)


def test_missing_target_and_bad_arguments_name_the_callback():
    with pytest.raises(PluginError, match=r"^callbacks\.x: needs a _target_"):
        build_callbacks({"x": {"log_every": 2}})
    with pytest.raises(PluginError, match=r"^callbacks\.x: .*'when'"):
        build_callbacks({"x": {"_target_": f"{MOD}.StopAt", "when": 3}})


# Options of the wrong type for their constructor parameter's annotation, for built-in and
# user plugins: a one-line ConfigError naming the option and what it takes.
WRONG_TYPES = [
    ("metrics_logger", "log_every", "abc", "an integer"),
    ("metrics_logger", "log_every", 2.5, "an integer"),  # callbacks.metrics.log_every=2.5
    ("metrics_logger", "jsonl", 1, "true or false"),  # an int is not a bool
    ("sharding_printer", "only_sharded", "yes", "true or false"),
    ("sharding_printer", "filter", 5, "a string or null"),  # str | None given a number
    ("spike_guard", "k", True, "a number"),  # a bool is not a float
    ("spike_guard", "window", 2.5, "an integer"),
    (f"{MOD}.RaiseAt", "at", "one", "an integer"),
    (f"{MOD}.Tagged", "label", [1], "a string or null"),
    (f"{MOD}.Tagged", "tags", "a", "a list or null"),
]


@pytest.mark.parametrize(("target", "option", "value", "wanted"), WRONG_TYPES)
def test_an_option_of_the_wrong_type_is_one_line_naming_it(target, option, value, wanted):
    with pytest.raises(ConfigError) as err:
        build_callbacks({"x": {"_target_": target, option: value}})
    message = str(err.value)
    assert message.startswith(f"callbacks.x.{option}: {value!r} is not {wanted} ("), message
    assert f"Fix: give callbacks.x.{option} {wanted}" in message and "\n" not in message


# The same options given to a plugin built in Python, which no config check sees: each
# plugin's on_setup refuses a value that is not an integer (or out of range) in one line.
NOT_INTEGERS = [
    (lambda: MetricsLogger(log_every=2.5), "log_every"),
    (lambda: MetricsLogger(log_every=0), "log_every"),
    (lambda: Sampler(every=True), "every"),
    (lambda: Sampler(max_new_tokens=2.5), "max_new_tokens"),
    (lambda: Sampler(top_k=0.5), "top_k"),
    (lambda: MlflowLogger(every=True), "every"),
    (lambda: WandbLogger(timeout=0), "timeout"),
    (lambda: MemStats(every=2.5), "every"),
    (lambda: MemStats(max_rows="8"), "max_rows"),
    (lambda: Profiler(num_steps=0), "num_steps"),
    (lambda: EarlyStopping(patience=1.5), "patience"),
    (lambda: SpikeGuard(window=0), "window"),
]


@pytest.mark.parametrize(("make", "option"), NOT_INTEGERS)
def test_a_plugin_built_in_python_refuses_a_bad_count_at_setup(make, option):
    plugin = make()
    plugin.name = "x"
    stub = types.SimpleNamespace(config=None, run_dir="", flops=None)
    with pytest.raises(ConfigError) as err:
        plugin.on_setup(stub, stub)
    message = str(err.value)
    assert message.startswith(f"callbacks.x.{option}: must be ") and "\n" not in message


def test_options_of_the_right_type_and_unchecked_ones_reach_the_plugin():
    options = {
        "every": 3,
        "label": None,
        "loud": True,
        "scale": 2,  # an int is a number
        "tags": ["a"],
        "anything": {"k": object()},
        "unannotated": "whatever",
    }
    (tagged,) = build_callbacks({"t": {"_target_": f"{MOD}.Tagged", **options}})
    assert (tagged.every, tagged.label, tagged.loud, tagged.scale) == (3, None, True, 2)
    assert tagged.tags == ["a"] and tagged.unannotated == "whatever"
    (printer,) = build_callbacks({"p": {"_target_": "sharding_printer", "filter": "attn"}})
    assert printer.filter == "attn"
    # Annotations that do not resolve: the plugin gets its options as given.
    (unchecked,) = build_callbacks({"u": {"_target_": f"{MOD}.Unchecked", "where": 5, "z": 1}})
    assert unchecked.where == 5 and unchecked.extra == {"z": 1}


# -- the sequence of hooks ------------------------------------------------------------


@pytest.fixture(scope="module")
def ordered_run(tmp_path_factory):
    """One run with callbacks zeta (all hooks), beta (on_step_end only), alpha (all hooks)."""
    cbt.LOG.clear()
    cfg = config(
        tmp_path_factory.mktemp("ordered"),
        f"+callbacks.zeta._target_={MOD}.Recorder",
        f"+callbacks.beta._target_={MOD}.StepOnly",
        f"+callbacks.alpha._target_={MOD}.Recorder",
    )
    result = Trainer(cfg).fit()
    log = list(cbt.LOG)
    return result, log


def test_hooks_fire_in_the_documented_sequence(ordered_run):
    result, log = ordered_run
    assert result.reason == "completed" and result.step == STEPS
    expected = [
        "on_setup",
        "on_compile",
        "on_train_start",
        *["on_step_end"] * STEPS,
        "on_train_end",
        "teardown",
    ]
    for name in ("zeta", "alpha"):
        assert [hook for who, hook, _ in log if who == name] == expected


def test_hooks_fire_in_config_order(ordered_run):
    _, log = ordered_run
    hooks = [hook for _, hook, _ in log]
    for hook in ("on_setup", "on_compile", "on_train_start", "on_train_end", "teardown"):
        assert [who for who, h, _ in log if h == hook] == ["zeta", "alpha"]
    steps = [(who, e.step) for who, h, e in log if h == "on_step_end"]
    assert steps == [(n, s) for s in range(1, STEPS + 1) for n in ("zeta", "beta", "alpha")]
    # Each step's hooks complete before the next step's begin, and setup precedes steps.
    assert hooks.index("on_step_end") > max(i for i, h in enumerate(hooks) if h == "on_compile")


def test_hooks_not_overridden_are_never_called(ordered_run):
    _, log = ordered_run
    beta = [hook for who, hook, _ in log if who == "beta"]
    assert beta == ["on_step_end"] * STEPS  # no lookup of any other hook, ever


def test_events_carry_the_facts_of_the_moment(ordered_run):
    result, log = ordered_run
    get = {hook: [e for who, h, e in log if who == "zeta" and h == hook] for _, hook, _ in log}
    (setup,) = get["on_setup"]
    assert isinstance(setup, SetupEvent)
    assert setup.run_dir == result.run_dir
    assert setup.flops.num_params == count_params(setup.config.model)
    assert setup.config.run.steps == STEPS
    (compiled,) = get["on_compile"]
    assert isinstance(compiled, CompileEvent)
    assert compiled.train.memory.total > 0 and compiled.train.name == "train"
    (start,) = get["on_train_start"]
    assert isinstance(start, TrainStartEvent)
    assert (start.step, start.num_steps) == (0, STEPS)
    steps = get["on_step_end"]
    assert all(isinstance(e, StepEndEvent) for e in steps)
    assert [e.step for e in steps] == list(range(1, STEPS + 1))
    assert all(e.num_steps == STEPS and e.tokens == 2 * 8 for e in steps)
    records = [e.record() for e in steps]  # lazily fetched, still available after the run
    assert [r.step for r in records] == list(range(1, STEPS + 1))
    assert all(r.seconds > 0 for r in records)
    assert all(a.completed_at <= b.completed_at for a, b in itertools.pairwise(records))
    m = steps[-1].metrics
    assert {"loss", "lm_loss", "perplexity", "total_weights", "grad_norm", "lr"} <= set(m)
    assert m["total_weights"] == 16.0
    assert m["perplexity"] == pytest.approx(np.exp(m["lm_loss"]), rel=1e-5)
    assert result.metrics["loss"] == pytest.approx(m["loss"])
    (end,) = get["on_train_end"]
    assert isinstance(end, TrainEndEvent)
    assert (end.step, end.reason) == (STEPS, "completed")


# -- control and failures -------------------------------------------------------------


def test_request_stop_ends_the_run_at_that_step(tmp_path):
    cfg = config(
        tmp_path,
        f"+callbacks.rec._target_={MOD}.Recorder",
        f"+callbacks.stopper._target_={MOD}.StopAt",
        "+callbacks.stopper.at=3",
    )
    result = Trainer(cfg).fit()
    assert result.step == 3
    assert result.reason.startswith("stopped")
    assert "asked by stopper at step 3" in result.reason
    assert [e.step for e in events("rec", "on_step_end")] == [1, 2, 3]
    (end,) = events("rec", "on_train_end")
    assert end.step == 3 and end.reason == result.reason
    assert calls("rec")[-2:] == ["on_train_end", "teardown"]
    assert int(np.asarray(result.state.step)) == 3


def test_a_callback_raising_is_a_plugin_error_naming_it(tmp_path):
    cfg = config(
        tmp_path,
        f"+callbacks.first._target_={MOD}.Recorder",
        f"+callbacks.bad._target_={MOD}.RaiseAt",
        "+callbacks.bad.at=2",
        f"+callbacks.quiet._target_={MOD}.StepOnly",
        f"+callbacks.last._target_={MOD}.Recorder",
    )
    with pytest.raises(PluginError) as err:
        Trainer(cfg).fit()
    message = str(err.value)
    assert "'bad'" in message and "on_step_end" in message and "boom at step 2" in message
    assert isinstance(err.value.__cause__, RuntimeError)
    # Callbacks before it in config order saw step 2; none saw step 3.
    assert [e.step for e in events("first", "on_step_end")] == [1, 2]
    assert [e.step for e in events("last", "on_step_end")] == [1]
    for name in ("first", "last"):
        (exc,) = events(name, "on_exception")
        assert isinstance(exc, ExceptionEvent)
        assert exc.exception is err.value
        assert exc.step == 2
        assert "on_train_end" not in calls(name)
        assert calls(name)[-2:] == ["on_exception", "teardown"]
    assert calls("bad") == ["teardown"]  # teardown reaches every callback
    assert all(hook == "on_step_end" for hook in calls("quiet"))  # no on_exception lookup


class NaNFromStep(SyntheticData):
    """Synthetic data whose loss weights are NaN from step index `start` on."""

    def __init__(self, start: int):
        super().__init__(vocab_size=64, branching=4, source_seed=1234, seed=0)
        self.start = start

    def batch(self, step, batch_size, seq_len, *args, **kwargs):
        b = super().batch(step, batch_size, seq_len, *args, **kwargs)
        if step >= self.start:
            b["weights"] = np.full_like(b["weights"], np.nan)
        return b


def test_non_finite_loss_from_the_data_ends_the_run_naming_the_step(tmp_path):
    cfg = config(tmp_path, f"+callbacks.rec._target_={MOD}.Recorder")
    result = Trainer(cfg, dataset=NaNFromStep(start=2)).fit()  # batch index 2 = step 3
    assert result.reason.startswith("not finite"), result.reason
    assert re.search(r"\bat step 3\b", result.reason), result.reason
    (end,) = events("rec", "on_train_end")
    assert end.reason == result.reason
    assert "teardown" in calls("rec")


def test_non_finite_loss_from_a_huge_learning_rate(tmp_path):
    cfg = config(tmp_path, "optim.lr=1e6", "optim.clip_norm=0", "optim.warmup_steps=0")
    result = Trainer(cfg).fit()
    assert result.reason.startswith("not finite"), result.reason
    assert re.search(r"\bat step \d+\b", result.reason), result.reason


def test_dry_run_compiles_and_writes_run_info(tmp_path):
    cfg = config(tmp_path, "run.dry_run=true", f"+callbacks.rec._target_={MOD}.Recorder")
    result = Trainer(cfg).fit()
    assert result.reason == "dry run"
    assert result.state is None
    assert result.step == 0
    hooks = calls("rec")
    assert hooks[:2] == ["on_setup", "on_compile"]  # compiled ...
    assert "on_train_start" not in hooks and "on_step_end" not in hooks  # ... never trained
    assert hooks[-1] == "teardown"
    info = json.loads((tmp_path / "run_info.json").read_text())
    for key in (
        "num_params",
        "tflops_per_step_per_device",
        "learnable_tflops",
        "attention_tflops",
        "compiled_memory",
    ):
        assert key in info, key
    flops = step_flops(cfg.model, 2, 8, num_devices=1)
    assert info["num_params"] == count_params(cfg.model)
    assert info["tflops_per_step_per_device"] == pytest.approx(flops.tflops_per_step_per_device)
    assert info["learnable_tflops"] == pytest.approx(flops.learnable_tflops)
    assert info["attention_tflops"] == pytest.approx(flops.attention_tflops)
    memory = info["compiled_memory"]
    assert {"argument", "output", "temp", "total"} <= set(memory)
    assert memory["total"] > 0


def test_a_step_the_host_delayed_shows_its_true_time_and_a_note(tmp_path):
    """Step 3 is dispatched after the host slept in step 2's hooks: the logger's seconds for
    it run from step 2's completion, so they include the wait, and its note follows the
    host-gap rule. Checked against the times the run recorded, never against the clock."""
    cfg = config(
        tmp_path,
        "+callbacks.log._target_=metrics_logger",
        "+callbacks.log.log_every=1",
        f"+callbacks.slow._target_={MOD}.SleepAt",
        "+callbacks.slow.at=2",
        "+callbacks.slow.seconds=0.2",
        f"+callbacks.rec._target_={MOD}.Recorder",
    )
    assert Trainer(cfg).fit().reason == "completed"
    lines = {
        x["step"]: x for x in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
    }
    assert sorted(lines) == list(range(1, STEPS + 1))
    records = {e.step: e.record() for e in events("rec", "on_step_end")}
    (slept_until,) = [t for who, hook, t in cbt.LOG if who == "slow" and hook == "slept until"]
    r2, r3 = records[2], records[3]
    assert r3.dispatched_at >= slept_until  # the loop dispatched step 3 after the hooks
    assert r3.seconds == r3.completed_at - r2.completed_at  # completion to completion ...
    assert r3.host_gap == max(0.0, r3.dispatched_at - r2.completed_at)  # ... and the idle part
    assert lines[3]["seconds"] == r3.seconds  # one step per line: the step's own time
    assert ("host" in lines[3].get("note", "")) == (r3.host_gap > 0.25 * r3.seconds)
    assert "warm-up" in lines[1].get("note", "")
