"""The sampler plugin: samples at every evaluation or every N steps, from token ids or text,
printed, in metrics.jsonl and TensorBoard; equal to `generate` on the run's parameters."""

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flax import nnx
from nnxtrain.plugins.sampler import Sampler

from nnxtrain import ConfigError, Trainer, compose, generate

BASE = ["model=tiny", "run.steps=4", "run.batch_size=4", "run.seq_len=16", "callbacks=none"]


def fit(tmp_path: Path, sampler: Sampler, *overrides: str) -> tuple[Trainer, Any]:
    sampler.name = "sample"
    trainer = Trainer(compose([*BASE, f"run.dir={tmp_path}", *overrides]), [sampler])
    return trainer, trainer.fit()


def records(run_dir: Path) -> list[dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "samples" in r]


def test_samples_token_prompts_at_every_evaluation(tmp_path, capsys):
    sampler = Sampler(prompts=[[1, 2, 3], [4]], max_new_tokens=5, tensorboard=False)
    trainer, result = fit(tmp_path, sampler, "run.eval_every=2")
    recs = records(tmp_path)
    assert [r["step"] for r in recs] == [2, 4]
    last = recs[-1]["samples"]
    assert [s["prompt"] for s in last] == [[1, 2, 3], [4]]
    # the last sample is greedy generation from the final parameters, each row alone
    model = nnx.merge(trainer.graphdef, result.state.params)
    for s in last:
        alone = generate(model, np.array([s["prompt"]]), max_new_tokens=5)
        assert s["sample"] == np.asarray(alone)[0].tolist()
    out = capsys.readouterr().out
    assert "sample at step 4: [4] -> " in out


def test_samples_text_every_n_steps_with_the_runs_tokenizer(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat. " * 200)
    sampler = Sampler(prompts=["the cat", ""], every=3, max_new_tokens=8)
    run = tmp_path / "run"
    fit(run, sampler, "data=text", f"data.path={corpus}", "run.eval_every=0")
    (rec,) = records(run)
    assert rec["step"] == 3
    assert [s["prompt"] for s in rec["samples"]] == ["the cat", ""]
    assert all(isinstance(s["sample"], str) for s in rec["samples"])
    assert "sample at step 3: 'the cat' -> " in capsys.readouterr().out
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))  # text went there too


@pytest.mark.parametrize(
    ("kw", "overrides", "key"),
    [
        ({"prompts": ["text"]}, ["run.eval_every=2"], "callbacks.sample.prompts"),
        ({"prompts": [[1]]}, ["run.eval_every=0"], "callbacks.sample.every"),
        ({"prompts": [[1000]]}, ["run.eval_every=2"], "callbacks.sample.prompts"),
        (
            {"prompts": [[1]], "max_new_tokens": 500},
            ["run.eval_every=2"],
            "callbacks.sample.max_new_tokens",
        ),
    ],
)
def test_bad_options_are_one_line_config_errors(tmp_path, kw, overrides, key):
    with pytest.raises(ConfigError) as e:
        fit(tmp_path, Sampler(**kw), *overrides)
    assert e.value.key.startswith(key)
