"""GRPO: sample G completions per prompt with nnxtrain's own KV-cache sampler, reward them
with plain Python functions, and update the policy with the clipped, token-mean loss.

    run = GRPO(compose([...]), rows)            # rows: [{"prompt": ..., <fields>}, ...]
    history = run.fit()                         # one `GrpoStep` per step

Each step takes `run.batch_size` prompts (row s*P + j of the rows, in order, wrapping),
samples `grpo.generations` completions of each (`nnxtrain.model.generation.generate`, at
`grpo.temperature`, at most `grpo.max_new_tokens` tokens, ended by EOS), and scores each
completion with every function of `grpo.rewards` (`_target_`: module.function, called as
`fn(prompt, completion_text, row) -> float`; the reward is their `weight`ed sum). The
advantages are normalised within each prompt's group, and one update of the policy
(`nnxtrain.prefs.grpo`: ratio clipped at 1 - epsilon_low, 1 + epsilon_high, optional k3
KL to the starting model with weight `grpo.beta`, the mean over every completion token
including its EOS) is the train step of SFT with this loss (`make_train_step`'s
`pair_loss`): the same optimizer, float32 moments, LoRA.

Sampling and training share the weights: the sampler gets `nnx.merge(graphdef,
state.params)`, a model over the very arrays of the train state on the same mesh (no
copy); what sampling adds is its KV cache (rows x (prompt + new tokens) x layers x 2 x
kv heads x head_dim) and its own compiled prefill and decode programs. The reference of
the KL (beta > 0) is a copy of the starting parameters, or with LoRA the model with its
adapters off (no copy). `grpo.iterations` updates per batch of samples: with one, the old
log-probs are the new ones, detached (the ratio is 1, the clip inactive, TRL's default);
with more, the old ones are the sampler's (computed once before the updates) and the
clip bites from the second update on.
Single process; no checkpointing of a GRPO run yet.
"""

import dataclasses
import importlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from rich.console import Console

from nnxtrain.config import Config, GrpoConfig
from nnxtrain.data.tokenizer import ByteTokenizer
from nnxtrain.errors import ConfigError, UserError, first_line
from nnxtrain.interop.init_from import load_params
from nnxtrain.model import Transformer, trainable
from nnxtrain.model.generation import generate
from nnxtrain.model.lora import adapters_off
from nnxtrain.parallel.mesh import build_mesh
from nnxtrain.parallel.sharding import merge_rules, use_rules
from nnxtrain.prefs.grpo import group_advantages, policy_sums, token_logps
from nnxtrain.train.compile import plan_state
from nnxtrain.train.step import PairLoss, make_optimizer, make_train_step

RewardFn = Callable[[str, str, dict[str, Any]], float]


@dataclasses.dataclass(frozen=True)
class Reward:
    """One reward function of grpo.rewards, its name and weight."""

    name: str
    fn: RewardFn
    weight: float


@dataclasses.dataclass(frozen=True)
class GrpoStep:
    """What one GRPO step measured (means over its prompts' completions)."""

    step: int
    reward: float  # the weighted sum
    rewards: dict[str, float]  # each function's mean, unweighted
    loss: float
    kl: float  # k3, per completion token (0 with beta 0: measured only with a reference)
    completion_length: float  # tokens, EOS included
    seconds: float


def load_rewards(cfg: GrpoConfig) -> list[Reward]:
    """The functions grpo.rewards names; a `_target_` that does not import is one line."""
    out = []
    for name, spec in cfg.rewards.items():
        key, target = f"grpo.rewards.{name}._target_", spec["_target_"]
        module, _, attr = target.rpartition(".")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError, ValueError) as e:
            raise ConfigError(key, f"cannot import {target!r} ({first_line(e)})", "fix it") from e
        if not callable(fn):
            raise ConfigError(key, f"{target!r} is not callable", "name a function")
        out.append(Reward(name, fn, float(spec.get("weight", 1.0))))
    if not out:
        raise ConfigError(
            "grpo.rewards", "names no reward function", "add grpo.rewards.NAME._target_=mod.fn"
        )
    return out


def score(reward: Reward, rows: list[dict[str, Any]], texts: list[str]) -> np.ndarray:
    """`reward`'s value of each completion; a function that raises or returns no number
    stops the run with one line naming it."""
    out = np.zeros(len(texts), np.float32)
    for i, (row, text) in enumerate(zip(rows, texts, strict=True)):
        try:
            value = reward.fn(row["prompt"], text, row)
        except Exception as e:  # the user's code: name it
            raise UserError(
                f"grpo.rewards.{reward.name} raised {first_line(e)} on the completion "
                f"{text[:60]!r}. Fix: correct the function"
            ) from e
        if isinstance(value, bool) or not isinstance(value, int | float | np.number):
            raise UserError(
                f"grpo.rewards.{reward.name} returned {type(value).__name__}, not a number. "
                "Fix: return a float"
            )
        out[i] = value
    return out


def grpo_loss(cfg: GrpoConfig, graphdef: nnx.GraphDef, lora: bool) -> PairLoss:
    """The train step's loss of a batch of completions (`nnxtrain.prefs.grpo`)."""

    def loss(model: Any, batch: dict[str, jax.Array], ref: Any) -> dict[str, jax.Array]:
        logps = token_logps(model, batch)
        ref_logps = None
        if cfg.beta:
            reference = adapters_off(model) if ref is None else nnx.merge(graphdef, ref)
            ref_logps = token_logps(reference, batch)
        return policy_sums(
            logps,
            batch.get("old_logps", logps),  # one update per batch: the old policy is this one
            batch["advantages"],
            batch["weights"],
            eps_low=cfg.epsilon_low,
            eps_high=cfg.epsilon_high,
            beta=cfg.beta,
            ref_logps=ref_logps,
        )

    return loss


class GRPO:
    """A GRPO run over `rows` (dicts with a "prompt" string) with the byte tokenizer or
    `tokenizer` (anything with encode, decode, eos_id, bos_ids)."""

    def __init__(
        self,
        config: Config,
        rows: Sequence[dict[str, Any]],
        tokenizer: Any = None,
        console: Console | None = None,
    ):
        self.tok = tokenizer or ByteTokenizer()
        model = dataclasses.replace(config.model, vocab_size=self.tok.vocab_size)
        self.config = cfg = dataclasses.replace(config, model=model)
        self.rows, self.rewards = list(rows), load_rewards(cfg.grpo)
        if not self.rows or not all(isinstance(r.get("prompt"), str) for r in self.rows):
            raise UserError('GRPO needs rows that each hold a "prompt" string')
        self.console = console or Console(soft_wrap=True)
        self.mesh, self.rules = build_mesh(cfg.mesh), merge_rules(cfg.mesh.rules)
        tx, schedule = make_optimizer(cfg.optim, cfg.run.steps)
        self.plan = plan_state(
            lambda rngs: Transformer(cfg.model, rngs=rngs),
            tx,
            cfg.run.seed,
            self.mesh,
            self.rules,
            trainable(cfg.model),
        )
        self.state = self.plan.initialize()
        if cfg.run.init_from:
            params = load_params(cfg, self.state.params, self.mesh, self.console)
            self.state = dataclasses.replace(self.state, params=params)
        lora = bool(cfg.model.lora.rank)
        # the KL's reference: the starting weights (a copy: the state is donated), or LoRA's base
        self.reference = None
        if cfg.grpo.beta and not lora:
            self.reference = jax.tree.map(jnp.copy, self.state.params)
        step = make_train_step(
            self.plan.graphdef,
            tx,
            schedule,
            0.0,
            1,
            0,
            self.plan.trainable,
            grpo_loss(cfg.grpo, self.plan.graphdef, lora),
        )
        self._update = jax.jit(step, donate_argnums=0)
        graphdef = self.plan.graphdef
        self._logps = jax.jit(lambda p, batch: token_logps(nnx.merge(graphdef, p), batch))

    def _prompts(self, step: int) -> tuple[list[dict[str, Any]], np.ndarray, np.ndarray]:
        """The step's rows, each repeated G times, their ids right-padded, and lengths."""
        p, g = self.config.run.batch_size, self.config.grpo.generations
        rows = [self.rows[(step * p + j) % len(self.rows)] for j in range(p)]
        bos = list(self.tok.bos_ids)
        ids = [bos + self.tok.encode([r["prompt"]]).tolist() for r in rows]
        width = max(len(x) for x in ids)
        padded = np.full((p * g, width), self.tok.eos_id, np.int32)
        lengths = np.zeros(p * g, np.int32)
        for i, x in enumerate(ids):
            padded[i * g : (i + 1) * g, : len(x)] = x
            lengths[i * g : (i + 1) * g] = len(x)
        return [r for r in rows for _ in range(g)], padded, lengths

    def _batch(
        self, prompts: np.ndarray, lengths: np.ndarray, new: np.ndarray
    ) -> tuple[dict[str, np.ndarray], list[list[int]]]:
        """Rows of prompt + completion (through its first EOS) and each completion's ids."""
        eos, rows = self.tok.eos_id, len(prompts)
        width = prompts.shape[1] + new.shape[1]
        tokens = np.full((rows, width), eos, np.int32)
        weights = np.zeros((rows, width - 1), np.float32)
        completions = []
        for i in range(rows):
            stop = np.flatnonzero(new[i] == eos)
            c = new[i, : stop[0] + 1] if len(stop) else new[i]
            n = int(lengths[i])
            tokens[i, :n], tokens[i, n : n + len(c)] = prompts[i, :n], c
            weights[i, n - 1 : n - 1 + len(c)] = 1.0  # the targets that are the completion's
            completions.append([int(t) for t in c if t != eos])
        batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": weights}
        return batch, completions

    def step(self, step: int) -> GrpoStep:
        """Samples, rewards and updates once; returns what it measured."""
        t0, g = time.perf_counter(), self.config.grpo
        rows, prompts, lengths = self._prompts(step)
        model = nnx.merge(self.plan.graphdef, self.state.params)  # the train state's arrays
        seed = (self.config.run.seed * 1_000_003 + step) % (2**32 - 1)
        new = generate(
            model,
            prompts,
            max_new_tokens=g.max_new_tokens,
            temperature=g.temperature,
            seed=seed,
            eos_id=self.tok.eos_id,
            prompt_lengths=lengths,
        )
        batch, completions = self._batch(prompts, lengths, np.asarray(new))
        texts = [self.tok.decode(c) for c in completions]
        scores = {r.name: score(r, rows, texts) for r in self.rewards}
        total = np.sum([r.weight * scores[r.name] for r in self.rewards], axis=0)
        batch["advantages"] = np.asarray(group_advantages(jnp.asarray(total), g.generations))
        with use_rules(self.mesh, self.rules):
            if g.iterations > 1:  # the sampler's log-probs: the ratio's old policy
                batch["old_logps"] = np.asarray(self._logps(self.state.params, batch))
            for _ in range(g.iterations):
                self.state, metrics = self._update(self.state, batch, None, self.reference)
        m = jax.device_get(metrics)
        return GrpoStep(
            step + 1,
            float(np.mean(total)),
            {k: float(v.mean()) for k, v in scores.items()},
            float(m["loss"]),
            float(m["kl"]),
            float(batch["weights"].sum() / len(rows)),
            time.perf_counter() - t0,
        )

    def fit(self) -> list[GrpoStep]:
        """`run.steps` steps; a line every `run.log_every`."""
        history = []
        for s in range(self.config.run.steps):
            history.append(record := self.step(s))
            if (s + 1) % self.config.run.log_every == 0 or s + 1 == self.config.run.steps:
                each = " ".join(f"{k} {v:.3f}" for k, v in record.rewards.items())
                self.console.print(
                    f"grpo step {record.step}/{self.config.run.steps} | reward "
                    f"{record.reward:.3f} ({each}) | loss {record.loss:.4f} | kl "
                    f"{record.kl:.4f} | completion {record.completion_length:.1f} tokens | "
                    f"{record.seconds:.2f} s",
                    markup=False,
                    highlight=False,
                )
        return history
