"""`run.init_from` with an nnxtrain run dir, in-process: the model's shape comes from the
run, its latest checkpoint's parameters start a new run at step 0 with a fresh optimizer,
a rerun of an interrupted start resumes it, and bad input is one line naming the key.
(A Hugging Face directory as the source: tests/interop/test_hf_init_from.py.)
"""

import io
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest
from nnxtrain.plugins.checkpointer import Checkpointer
from rich.console import Console

from nnxtrain import Callback, ConfigError, Trainer, UserError, compose
from nnxtrain.checkpoint.reader import locate
from nnxtrain.train.step import make_schedule

# No model=...: the shape must come from run.init_from (the default model is `small`).
BASE = ["mesh=single", "run.batch_size=4", "run.seq_len=16", "run.eval_every=0", "callbacks=none"]


class Probe(Callback):
    """Keeps the state the loop starts from and ends with; stops after `stop_at`."""

    def __init__(self, stop_at: int | None = None):
        self.stop_at = stop_at
        self.start: Any = None
        self.end: Any = None

    def on_train_start(self, trainer: Any, event: Any) -> None:
        self.start = jax.device_get(trainer.state)

    def on_step_end(self, trainer: Any, event: Any) -> None:
        if event.step == self.stop_at:
            trainer.request_stop("test stop")

    def on_train_end(self, trainer: Any, event: Any) -> None:
        self.end = jax.device_get(trainer.state)


def fit(
    run_dir: Path, *callbacks: Callback, overrides: tuple[str, ...] = ()
) -> tuple[Any, Trainer, str]:
    out = io.StringIO()
    cfg = compose([*BASE, *overrides, f"run.dir={run_dir}"])
    trainer = Trainer(cfg, list(callbacks), console=Console(file=out, width=400))
    result = trainer.fit()
    return result, trainer, out.getvalue()


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """A tiny model trained 6 steps (checkpoints at 3 and 6), and its final state."""
    run_dir = tmp_path_factory.mktemp("source")
    probe = Probe()
    fit(run_dir, Checkpointer(every=3), probe, overrides=("model=tiny", "run.steps=6"))
    return run_dir, probe.end


def leaves_equal(a: Any, b: Any) -> bool:
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return all(np.array_equal(x, y) for x, y in pairs)


def test_a_run_dir_gives_its_shape_and_latest_parameters_at_step_0(source, tmp_path):
    src, final = source
    probe = Probe()
    result, trainer, text = fit(tmp_path, probe, overrides=(f"run.init_from={src}", "run.steps=2"))
    tiny = compose(["model=tiny"]).model
    assert (trainer.config.model.emb_dim, trainer.config.model.num_layers) == (
        tiny.emb_dim,
        tiny.num_layers,
    )
    assert f"init_from: took the parameters of step 6 ({src}/checkpoints/6)" in text
    assert int(probe.start.step) == 0 and result.step == 2
    assert leaves_equal(probe.start.params, final.params)
    assert not leaves_equal(probe.start.opt_state, final.opt_state)
    assert all(not np.any(x) for x in jax.tree.leaves(probe.start.opt_state[1][0].mu))
    assert not leaves_equal(probe.end.params, final.params)  # and it trained


def test_one_step_dir_gives_that_step(source, tmp_path):
    probe = Probe()
    src = source[0] / "checkpoints" / "3"
    _, _, text = fit(tmp_path, probe, overrides=(f"run.init_from={src}", "run.steps=1"))
    assert "took the parameters of step 3" in text
    assert not leaves_equal(probe.start.params, source[1].params)  # step 3's, not 6's


def test_a_rerun_resumes_the_fine_tune_not_the_source(source, tmp_path):
    src, final = source
    args = (f"run.init_from={src}", "run.steps=4")
    first = Probe(stop_at=2)
    result, _, _ = fit(tmp_path, Checkpointer(every=0), first, overrides=args)
    assert result.step == 2
    second = Probe()
    result, _, text = fit(tmp_path, Checkpointer(every=0), second, overrides=args)
    assert "resumed from step 2" in text and "init_from: took" not in text
    assert int(second.start.step) == 2 and result.step == 4
    assert leaves_equal(second.start.params, first.end.params)
    assert not leaves_equal(second.start.params, final.params)


def test_model_keys_of_how_it_runs_stay_the_users_and_shape_keys_must_agree(source):
    src = source[0]
    tiny = compose(["model=tiny"]).model
    cfg = compose(
        [f"run.init_from={src}", "model.remat=full", "model.max_len=256", "model.emb_dim=32"]
    )
    assert (cfg.model.remat, cfg.model.max_len, cfg.model.emb_dim) == ("full", 256, tiny.emb_dim)
    assert cfg.model.name == tiny.name and cfg.model.mlp_dim == tiny.mlp_dim
    with pytest.raises(ConfigError) as err:
        compose([f"run.init_from={src}", "model.num_layers=3"])
    assert str(err.value).startswith(
        f"model.num_layers: 3 conflicts with run.init_from={src}, whose model has "
        f"{tiny.num_layers}. Fix: drop model.num_layers"
    )


def test_bad_paths_are_one_line_naming_run_init_from(source, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text((source[0] / "config.yaml").read_text())
    cases = {
        tmp_path / "nope": "does not exist",
        tmp_path / "empty": "holds neither config.json (a Hugging Face model) nor checkpoints",
        tmp_path / "run": "has no complete checkpoint",
    }
    for path, expected in cases.items():
        with pytest.raises(UserError) as err:
            compose([f"run.init_from={path}"])
        message = str(err.value)
        assert message.startswith("run.init_from: ") and expected in message, message
        assert "\n" not in message


def test_locate_finds_the_latest_step_and_its_config(source):
    ckpt = locate(str(source[0]))
    assert (ckpt.step, ckpt.steps) == (6, (3, 6))
    assert ckpt.config["model"]["name"] == "tiny"


def test_a_tokenizer_larger_than_the_models_vocabulary_is_refused(source, tmp_path):
    """The source (synthetic data, 64 tokens) left no tokenizer: text then uses bytes (257)."""
    (tmp_path / "corpus.txt").write_text("some text to read " * 50)
    corpus = f"data.path={tmp_path}/corpus.txt"
    cfg = compose([*BASE, f"run.init_from={source[0]}", "data=text", corpus])
    assert cfg.data.tokenizer == "" and cfg.model.vocab_size == 64
    with pytest.raises(ConfigError) as err:
        Trainer(cfg)
    assert str(err.value).startswith(
        f"data.tokenizer: has 257 tokens, more than the 64 of the model of "
        f"run.init_from={source[0]}"
    )


def test_the_finetune_experiment_warms_up_over_3_percent_then_decays_to_0():
    optim = compose(["+experiment=finetune"]).optim
    assert (optim.lr, optim.weight_decay, optim.clip_norm) == (2e-5, 0.0, 1.0)
    lr = make_schedule(optim, 100)  # warmup: ceil(0.03 * 100) = 3 steps
    assert [float(lr(s)) for s in (0, 3)] == pytest.approx([0.0, 2e-5])
    assert float(lr(1)) == pytest.approx(2e-5 / 3) and float(lr(100)) == pytest.approx(0.0)
    assert float(make_schedule(optim, 20)(1)) == pytest.approx(2e-5)  # ceil(0.6) = 1 step


def test_a_recorded_moe_section_comes_back_as_its_config():
    """A run's recorded config.yaml holds model.moe as a mapping (like model.lora): it is
    rebuilt as MoeConfig, so a mixture of experts' run dir is a run.init_from source."""
    from nnxtrain.config import MoeConfig
    from nnxtrain.interop.init_from import _model_config

    saved = {"name": "m", "moe": {"experts": 4, "top_k": 2, "a_key_of_a_later_version": 1}}
    assert _model_config(saved).moe == MoeConfig(experts=4, top_k=2)
