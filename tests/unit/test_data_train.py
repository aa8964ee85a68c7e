"""Training on real text: the loss and the held-out loss fall; the vocabulary follows the data."""

from pathlib import Path

import numpy as np
import pytest

from nnxtrain import Callback, Trainer, compose
from nnxtrain.data import CHAR_VOCAB

VERSES = [
    "twinkle twinkle little star, how I wonder what you are.",
    "up above the world so high, like a diamond in the sky.",
    "row row row your boat, gently down the stream.",
    "merrily merrily merrily merrily, life is but a dream.",
]


class EvalLog(Callback):
    def __init__(self) -> None:
        self.train: list[float] = []
        self.eval: list[tuple[int, float]] = []

    def on_step_end(self, trainer, event):
        self.train.append(event.metrics["loss"])

    def on_eval_end(self, trainer, event):
        self.eval.append((event.step, event.metrics["eval/loss"]))


@pytest.fixture(scope="module")
def text_run(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("text_run")
    rng = np.random.default_rng(0)
    # A small repetitive corpus, with documents separated by blank lines.
    docs = ["\n".join(rng.choice(VERSES, size=4)) for _ in range(120)]
    (tmp / "rhymes.txt").write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    cfg = compose(
        [
            "model=tiny",
            "data=text",
            f"data.path={tmp}/rhymes.txt",
            "data.tokenizer=char",
            "data.doc_separator=\\n\\n",
            "run.steps=40",
            "run.batch_size=8",
            "run.seq_len=32",
            "run.eval_every=10",
            "run.eval_batches=2",
            "run.log_every=100",
            "optim.warmup_steps=5",
            "optim.lr=1e-2",
            f"run.dir={tmp}/run",
            "callbacks=none",
        ]
    )
    log = EvalLog()
    trainer = Trainer(cfg, [log])
    result = trainer.fit()
    return tmp, trainer, result, log


def test_train_and_eval_loss_fall_on_real_text(text_run):
    _, trainer, result, log = text_run
    assert result.reason == "completed" and len(log.train) == 40
    vocab = trainer.config.model.vocab_size
    assert log.train[0] > 0.9 * np.log(vocab)  # starts near the uniform guess
    assert np.mean(log.train[-5:]) < 0.6 * np.mean(log.train[:5])
    steps = [s for s, _ in log.eval]
    losses = [loss for _, loss in log.eval]
    assert steps == [10, 20, 30, 40]
    assert losses[-1] < losses[0] - 0.3 and losses[-1] < 0.6 * np.log(vocab)
    assert result.eval_metrics["eval/loss"] == losses[-1]
    assert result.eval_metrics["eval/total_weights"] == 2 * 8 * 32  # full batches


def test_model_vocab_follows_the_char_tokenizer_saved_in_the_run_dir(text_run):
    _, trainer, _, _ = text_run
    chars = set("".join(VERSES)) | {"\n"}
    assert trainer.config.model.vocab_size == len(chars) + 2 == trainer.dataset.vocab_size
    assert Path(trainer.run_dir, CHAR_VOCAB).is_file()
    assert trainer.run_info["final"]["step"] == 40
