"""The eval step is compiled ahead of time, beside the train step, under the same rules.

Before issue 12 the eval step was jitted lazily and first traced in `evaluate()`, outside
`use_rules`: it compiled in the middle of training and without its activations' sharding
constraints. These tests fail if either comes back.
"""

import logging

import jax
import numpy as np
import pytest
from conftest import compile_cache_override
from flax import nnx

from nnxtrain import Callback, CompileEvent, Trainer, compose
from nnxtrain.train.loss import loss_sums

STEPS, EVAL_EVERY = 4, 2


class CompileLog(logging.Handler):
    """Collects JAX's 'Compiling <fn>' log lines (jax_log_compiles), with a marker when the
    first step is about to run."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("Compiling "):
            self.lines.append(record.getMessage().split(" with ")[0])


class Watch(Callback):
    def __init__(self, log: CompileLog):
        self.log, self.compile_event, self.at_train_start = log, None, -1
        self.evals: list[dict[str, float]] = []

    def on_compile(self, trainer, event):
        self.compile_event = event

    def on_train_start(self, trainer, event):
        self.at_train_start = len(self.log.lines)

    def on_eval_end(self, trainer, event):
        self.evals.append(dict(event.metrics))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    log = CompileLog()
    logger = logging.getLogger("jax")
    logger.addHandler(log)
    saved = jax.config.jax_log_compiles
    jax.config.update("jax_log_compiles", True)
    try:
        cfg = compose(
            [
                "model=tiny",
                "run.batch_size=2",
                "run.seq_len=8",
                f"run.steps={STEPS}",
                f"run.eval_every={EVAL_EVERY}",
                "run.eval_batches=3",
                "callbacks=none",
                f"run.dir={tmp_path_factory.mktemp('eval')}",
                compile_cache_override(),
            ]
        )
        watch = Watch(log)
        trainer = Trainer(cfg, [watch])
        result = trainer.fit()
    finally:
        jax.config.update("jax_log_compiles", saved)
        logger.removeHandler(log)
    return trainer, watch, result, log


def test_eval_is_compiled_before_the_first_step_and_nothing_compiles_after(run):
    _, watch, result, log = run
    assert result.reason == "completed" and len(watch.evals) == STEPS // EVAL_EVERY
    before = log.lines[: watch.at_train_start]
    assert "Compiling jit(eval_step)" in before and "Compiling jit(train_step)" in before
    assert log.lines[watch.at_train_start :] == []  # the loop and its evaluations compile nothing


def test_eval_step_is_traced_under_the_rules(run):
    trainer, watch, _, _ = run
    event = watch.compile_event
    assert isinstance(event, CompileEvent) and event.eval is not None
    assert event.eval is trainer.eval_step and event.train.name == "train"
    # Activations are recorded only by `constrain` inside `use_rules`: traced outside the
    # rules, the eval step would record none.
    assert set(event.eval.activations) == set(event.train.activations) != set()
    for name, record in event.eval.activations.items():
        assert record.physical == event.train.activations[name].physical
    params_shardings = jax.tree.leaves(trainer.state_shardings.params)
    assert jax.tree.leaves(event.eval.compiled.input_shardings[0][0]) == params_shardings
    assert event.eval.memory.total > 0 and event.eval.compile_seconds >= 0
    info = trainer.run_info
    assert info["eval_compiled_memory"] == event.eval.memory.as_dict()
    assert {"eval_lower_seconds", "eval_compile_seconds"} <= set(info)


def test_eval_metrics_are_the_weighted_means_over_the_held_out_batches(run):
    trainer, watch, _, _ = run
    run_cfg, z_loss = trainer.config.run, trainer.config.optim.z_loss
    model = nnx.merge(trainer.graphdef, trainer.state.params)
    ce = z = weight = 0.0
    for i in range(run_cfg.eval_batches):
        b = trainer.dataset.batch(i, run_cfg.batch_size, run_cfg.seq_len, "eval")
        sums = loss_sums(model(b["inputs"]), b["targets"], b["weights"], z_loss)
        ce, z, weight = ce + float(sums["ce"]), z + float(sums["z"]), weight + float(sums["weight"])
    last = watch.evals[-1]
    # Both sides sum 3 batches of 16 float32 terms, in different programs: a few float32
    # ulps (1.2e-7 each) of the ~4.0 loss, so rtol 1e-5 leaves room and still fails on any
    # wrong weighting (a batch dropped or counted twice moves it by percents).
    np.testing.assert_allclose(last["eval/lm_loss"], ce / weight, rtol=1e-5)
    np.testing.assert_allclose(last["eval/loss"], (ce + z) / weight, rtol=1e-5)
    assert last["eval/total_weights"] == weight
    np.testing.assert_allclose(last["eval/perplexity"], np.exp(ce / weight), rtol=1e-5)
