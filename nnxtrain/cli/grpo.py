"""`python -m nnxtrain.cli.grpo [overrides]`: GRPO's toy task, "produce the digits of a
sum", on a CPU in a minute or two: a sanity check that reward rises.

A random tiny model (the byte tokenizer) is prompted "a+b=" (a, b in 0..9) and rewarded by
`nnxtrain.prefs.rewards`: `digits` (the share of digit characters, weight 0.5) and
`correct` (the exact sum, weight 1). It prints a line per `run.log_every` steps and, at
the end, the mean reward of the first and the last 10 steps. Any key can be overridden
(`grpo.generations=16`, `run.steps=200`, `+grpo.rewards.mine._target_=my.fn`, ...).
"""

import sys

from nnxtrain.cli.bad_input import bad_input
from nnxtrain.config import compose
from nnxtrain.errors import UserError
from nnxtrain.prefs.rewards import sum_rows
from nnxtrain.train.grpo import GRPO

TOY = [
    "model=tiny",
    "mesh=single",
    "callbacks=none",
    "run.steps=60",
    "run.batch_size=4",
    "run.log_every=10",
    "run.eval_every=0",
    "optim.lr=1e-2",
    "optim.warmup_steps=5",
    "optim.weight_decay=0",
    "grpo.generations=8",
    "grpo.max_new_tokens=4",
    "+grpo.rewards.digits._target_=nnxtrain.prefs.rewards.digits",
    "+grpo.rewards.digits.weight=0.5",
    "+grpo.rewards.correct._target_=nnxtrain.prefs.rewards.correct",
    "+grpo.rewards.correct.weight=1.0",
]


def toy(overrides: list[str]) -> list[float]:
    """Runs the toy task; returns each step's mean reward."""
    run = GRPO(compose([*TOY, *overrides]), sum_rows(512, seed=0))
    history = [r.reward for r in run.fit()]
    first, last = history[:10], history[-10:]
    print(
        f"mean reward: first {len(first)} steps {sum(first) / len(first):.3f}, "
        f"last {len(last)} steps {sum(last) / len(last):.3f}"
    )
    return history


def main() -> None:
    try:
        toy(sys.argv[1:])
    except UserError as e:
        bad_input("nnxtrain-grpo", e)


if __name__ == "__main__":
    main()
