"""Sampler: generates text from fixed prompts while the model trains.

    nnxtrain data=text data.path=book.txt run.eval_every=200 +callbacks.sample._target_=sampler \
        '+callbacks.sample.prompts=["Once upon a time", "The"]'
    nnxtrain +callbacks.sample._target_=sampler +callbacks.sample.every=100 \
        '+callbacks.sample.prompts=[[1, 2, 3]]'        # token ids: runs without a tokenizer

After every evaluation (or, with `every` > 0, every `every` steps instead) it continues
each prompt with `nnxtrain.generate` from the current parameters, all prompts in one
batch (right-padded, each row from its own length), and:

- prints the samples;
- appends one record `{"step", "samples": [{"prompt", "sample"}, ...], "time"}` to
  `<run_dir>/metrics.jsonl` (process 0; a single appended line, beside the metrics
  logger's own, which every reader of that file tells apart by its keys);
- adds them as TensorBoard text (`samples/<i>`) when tensorboardX is installed.

Prompts are strings, tokenized with the run's tokenizer (`nnxtrain.run_tokenizer`; an
empty string starts a new document, i.e. the end-of-sequence token), or lists of token
ids, which also work for synthetic data (no tokenizer). Samples end at the tokenizer's
end-of-sequence token. Generation compiles once, at the first sample; later ones reuse it.
Uses only the public API of `nnxtrain`.
"""

import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from nnxtrain import (
    Callback,
    ConfigError,
    EvalEndEvent,
    SetupEvent,
    StepEndEvent,
    TrainerView,
    check_int,
    generate,
    json_line,
    run_tokenizer,
)


class Sampler(Callback):
    """Generates from configured prompts at every evaluation, or every `every` steps."""

    def __init__(
        self,
        prompts: Sequence[str | Sequence[int]] = ("",),
        every: int = 0,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        tensorboard: bool = True,
    ):
        self.prompts, self.every, self.max_new_tokens = list(prompts), every, max_new_tokens
        self.temperature, self.top_k, self.top_p, self.seed = temperature, top_k, top_p, seed
        self.use_tb = tensorboard
        self._tokenizer: Any = None
        self._ids: list[list[int]] = []
        self._tb: Any = None
        self._path = ""

    def on_setup(self, trainer: TrainerView, event: SetupEvent) -> None:
        key, cfg = f"callbacks.{self.name}", event.config
        for opt, low in (("every", 0), ("max_new_tokens", 1), ("top_k", 0), ("seed", 0)):
            check_int(f"{key}.{opt}", getattr(self, opt), low, f"set {key}.{opt}")
        if self.every == 0 and cfg.run.eval_every == 0:
            raise ConfigError(
                f"{key}.every",
                "is 0 (sample at every evaluation), but the run never evaluates",
                f"set {key}.every=N to sample every N steps, or run.eval_every=N",
            )
        if not self.prompts:
            raise ConfigError(f"{key}.prompts", "is empty", f"give {key}.prompts=['some text']")
        if any(isinstance(p, str) for p in self.prompts):
            self._tokenizer = run_tokenizer(cfg, event.run_dir)
            if self._tokenizer is None:
                raise ConfigError(
                    f"{key}.prompts",
                    f"text needs a tokenizer, and this run has none (data={cfg.data.name})",
                    f"give token id lists, e.g. {key}.prompts=[[1,2,3]]",
                )
        self._ids = [self._encode(p) for p in self.prompts]
        vocab, limit = cfg.model.vocab_size, cfg.model.max_len
        for i, ids in enumerate(self._ids):
            if not ids or min(ids) < 0 or max(ids) >= vocab:
                raise ConfigError(
                    f"{key}.prompts",
                    f"prompt {i} must be token ids in 0..{vocab - 1}, got {ids}",
                    "give ids the model knows",
                )
            if len(ids) + self.max_new_tokens > limit:
                raise ConfigError(
                    f"{key}.max_new_tokens",
                    f"prompt {i} ({len(ids)} tokens) plus {self.max_new_tokens} new tokens "
                    f"exceeds model.max_len={limit}",
                    "generate fewer tokens or shorten the prompt",
                )
        if trainer.console.quiet:  # processes other than 0 generate along, write nothing
            return
        self._path = os.path.join(event.run_dir, "metrics.jsonl")
        if self.use_tb:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                pass  # the metrics logger already says that TensorBoard is off
            else:
                self._tb = SummaryWriter(os.path.join(event.run_dir, "tensorboard"))

    def on_eval_end(self, trainer: TrainerView, event: EvalEndEvent) -> None:
        if self.every == 0:
            self.sample(trainer, event.step)

    def on_step_end(self, trainer: TrainerView, event: StepEndEvent) -> None:
        if self.every and event.step % self.every == 0:
            self.sample(trainer, event.step)

    def sample(self, trainer: TrainerView, step: int) -> list[dict[str, Any]]:
        """Generates from every prompt with the current parameters; reports and returns them."""
        assert trainer.state is not None
        width = max(map(len, self._ids))
        prompts = np.zeros((len(self._ids), width), np.int32)
        for row, ids in enumerate(self._ids):
            prompts[row, : len(ids)] = ids
        eos = self._tokenizer.eos_id if self._tokenizer is not None else None
        new = generate(
            nnx.merge(trainer.graphdef, trainer.state.params),
            prompts,
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            seed=self.seed,
            eos_id=eos,
            prompt_lengths=np.array([len(ids) for ids in self._ids]),
        )
        if not new.is_fully_addressable:  # several processes, each holding some rows
            new = multihost_utils.process_allgather(new, tiled=True)
        rows = np.asarray(jax.device_get(new)).tolist()
        samples = [
            {"prompt": p, "sample": self._decode(r)}
            for p, r in zip(self.prompts, rows, strict=True)
        ]
        for s in samples:
            trainer.console.print(
                f"sample at step {step}: {s['prompt']!r} -> {s['sample']!r}",
                markup=False,
                highlight=False,
            )
        if self._path:
            with open(self._path, "a") as f:  # one write: lines never interleave
                f.write(json_line({"step": step, "samples": samples, "time": time.time()}))
        if self._tb is not None:
            for i, s in enumerate(samples):
                self._tb.add_text(f"samples/{i}", f"{s['prompt']!r} -> {s['sample']!r}", step)
            self._tb.flush()
        return samples

    def teardown(self, trainer: TrainerView) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def _encode(self, prompt: str | Sequence[int]) -> list[int]:
        if not isinstance(prompt, str):
            return [int(i) for i in prompt]
        tok = self._tokenizer
        return [int(i) for i in tok.encode([prompt])] or [int(tok.eos_id)]

    def _decode(self, ids: list[int]) -> str | list[int]:
        if self._tokenizer is None:
            return ids
        eos = self._tokenizer.eos_id
        return str(self._tokenizer.decode(ids[: ids.index(eos)] if eos in ids else ids))
