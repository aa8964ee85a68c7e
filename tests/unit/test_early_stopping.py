"""Early stopping: stops a run whose metric stalls, spares an improving one, keeps its state."""

import json
import types
from pathlib import Path
from typing import Any

import pytest
from nnxtrain.plugins.early_stopping import EarlyStopping

from nnxtrain import (
    Callback,
    ConfigError,
    EvalEndEvent,
    PluginError,
    SetupEvent,
    Trainer,
    compose,
)
from nnxtrain.train.registry import build_callbacks

# Every run here compiles the same train step (same model, batch, steps and schedule), so
# the session's compilation cache makes all but the first compile cheap.
BASE = ["model=tiny", "run.steps=12", "run.batch_size=4", "run.seq_len=16"]
BASE += ["callbacks=none", "optim.warmup_steps=2"]
NO_TRAINER: Any = types.SimpleNamespace()  # hooks that must fail before touching the trainer


class EvalLosses(Callback):
    """Keeps (step, eval/loss) of every evaluation."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, float]] = []

    def on_eval_end(self, trainer: Trainer, event: EvalEndEvent) -> None:
        self.seen.append((event.step, event.metrics["eval/loss"]))


def fit(tmp_path: Path, es: EarlyStopping, *overrides: str) -> tuple[Any, EvalLosses]:
    es.name = "es"
    losses = EvalLosses()
    cfg = compose([*BASE, f"run.dir={tmp_path}", *overrides])
    return Trainer(cfg, [es, losses]).fit(), losses


def test_stops_when_eval_loss_stops_improving(tmp_path: Path) -> None:
    # No evaluation can beat the first by min_delta=100: two bad checks after it stop the run.
    es = EarlyStopping(monitor="eval/loss", patience=2, min_delta=100.0)
    result, losses = fit(tmp_path, es, "run.eval_every=2")
    assert result.step == 6
    assert [s for s, _ in losses.seen] == [2, 4, 6]
    first = losses.seen[0][1]
    assert result.reason.startswith("stopped: early stopping: eval/loss did not improve")
    assert f"best {first:.6g} at step 2" in result.reason
    assert f"now {losses.seen[-1][1]:.6g} at step 6" in result.reason
    assert es.state_dict() == {"best": first, "best_step": 2, "bad_checks": 2}


def test_improving_run_is_not_stopped(tmp_path: Path) -> None:
    es = EarlyStopping(monitor="eval/loss", patience=1)
    result, losses = fit(tmp_path, es, "run.eval_every=4")
    values = [v for _, v in losses.seen]
    assert values == sorted(values, reverse=True) and len(set(values)) == 3  # it did improve
    assert result.reason == "completed" and result.step == 12
    assert es.state_dict() == {"best": values[-1], "best_step": 12, "bad_checks": 0}


def test_train_metric_every_check_every_steps_in_max_mode(tmp_path: Path) -> None:
    # The learning rate peaks when warm-up ends (step 2 or 3) and decays after: checked at
    # steps 3, 6, 9, the best is step 3's and the second bad check (step 9) stops the run.
    es = EarlyStopping(monitor="lr", mode="max", patience=2, check_every=3)
    result, _ = fit(tmp_path, es, "run.eval_every=0")
    assert result.step == 9
    assert "early stopping: lr did not improve" in result.reason
    assert "at step 3, now" in result.reason and "at step 9)" in result.reason
    assert es.best_step == 3 and es.bad_checks == 2


class StopLog:
    """A stand-in trainer that records stop requests."""

    def __init__(self) -> None:
        self.reasons: list[str] = []

    def request_stop(self, reason: str) -> None:
        self.reasons.append(reason)


def evaluate(es: EarlyStopping, trainer: Any, step: int, loss: float) -> None:
    es.on_eval_end(trainer, EvalEndEvent(step, {"eval/loss": loss}, 1, 0.0))


def test_state_rides_along_and_min_delta_is_strict() -> None:
    first, trainer = EarlyStopping(patience=2, min_delta=0.1), StopLog()
    evaluate(first, trainer, 2, 1.0)
    evaluate(first, trainer, 4, 0.95)  # not better by more than 0.1: a bad check
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint keeps
    assert state == {"best": 1.0, "best_step": 2, "bad_checks": 1}

    resumed = EarlyStopping(patience=2, min_delta=0.1)
    resumed.load_state_dict(state)
    evaluate(resumed, trainer, 6, 0.92)
    assert trainer.reasons == [
        "early stopping: eval/loss did not improve by more than 0.1 for 2 checks "
        "(best 1 at step 2, now 0.92 at step 6)"
    ]
    fresh = EarlyStopping(patience=2, min_delta=0.1)
    fresh.load_state_dict(state)
    evaluate(fresh, trainer, 6, 0.85)  # better by more than min_delta: resets the count
    assert fresh.state_dict() == {"best": 0.85, "best_step": 6, "bad_checks": 0}
    assert len(trainer.reasons) == 1


def test_nan_is_never_an_improvement() -> None:
    es, trainer = EarlyStopping(patience=1), StopLog()
    evaluate(es, trainer, 2, float("nan"))
    assert es.best is None and len(trainer.reasons) == 1
    assert "best none at step 0, now nan at step 2" in trainer.reasons[0]


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"monitor": "eval/acc"}, "monitor"),
        ({"mode": "up"}, "mode"),
        ({"patience": 0}, "patience"),
        ({"check_every": 1.5}, "check_every"),
        ({"min_delta": -1}, "min_delta"),
    ],
)
def test_bad_option_is_one_line_naming_the_key(options: dict[str, Any], key: str) -> None:
    es = EarlyStopping(**options)
    es.name = "es"
    with pytest.raises(ConfigError) as err:
        es.on_setup(NO_TRAINER, setup_event(eval_every=2))
    assert str(err.value).startswith(f"callbacks.es.{key}: ") and "\n" not in str(err.value)


def test_eval_metric_without_evaluations_is_refused() -> None:
    es = EarlyStopping(monitor="eval/loss")
    es.name = "stop"
    with pytest.raises(ConfigError, match=r"^callbacks\.stop\.monitor: .*run\.eval_every=0"):
        es.on_setup(NO_TRAINER, setup_event(eval_every=0))
    EarlyStopping(monitor="loss").on_setup(NO_TRAINER, setup_event(eval_every=0))  # train: fine


def test_unknown_constructor_key_names_the_plugin() -> None:
    with pytest.raises(PluginError, match=r"^callbacks\.es: EarlyStopping refused its options"):
        build_callbacks({"es": {"_target_": "early_stopping", "patiense": 2}})
    (es,) = build_callbacks({"es": {"_target_": "early_stopping", "patience": 2}})
    assert isinstance(es, EarlyStopping) and es.name == "es" and es.patience == 2


def setup_event(eval_every: int) -> SetupEvent:
    cfg = compose([*BASE, f"run.eval_every={eval_every}"])
    stub: Any = types.SimpleNamespace()
    return SetupEvent(cfg, stub, stub, stub, "/nonexistent", None)
