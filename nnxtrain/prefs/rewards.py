"""The toy GRPO task, "produce the digits of a sum": its prompts and reward functions.

A reward function is any Python callable `(prompt, completion, row) -> float` (`row`: the
prompt's record, here {"prompt", "answer"}); GRPO takes several by `_target_`, each with a
weight (docs/preference.md). These two shape the task for a model that starts random:

    digits(prompt, completion, row)   the share of the completion's characters that are digits
    places(prompt, completion, row)   the share of the sum's digits the completion has in place
    correct(prompt, completion, row)  1 if the completion is the sum, else 0
"""

from typing import Any

import numpy as np


def sum_rows(count: int, seed: int = 0, largest: int = 9) -> list[dict[str, Any]]:
    """`count` prompts "a+b=" with a, b in 0..largest, and their answers."""
    rng = np.random.default_rng(seed)
    rows = []
    for a, b in rng.integers(0, largest + 1, (count, 2)).tolist():
        rows.append({"prompt": f"{a}+{b}=", "answer": str(a + b)})
    return rows


def digits(prompt: str, completion: str, row: dict[str, Any]) -> float:
    """The share of the completion's characters that are digits (0 for an empty one)."""
    return sum(c.isdigit() for c in completion) / len(completion) if completion else 0.0


def places(prompt: str, completion: str, row: dict[str, Any]) -> float:
    """The share of the answer's characters that the completion has at their place, less
    a share for each character beyond the answer's length."""
    answer = row["answer"]
    right = sum(a == c for a, c in zip(answer, completion, strict=False))
    extra = max(len(completion) - len(answer), 0)
    return (right - extra) / len(answer)


def correct(prompt: str, completion: str, row: dict[str, Any]) -> float:
    """1.0 when the completion is the sum's digits, else 0.0."""
    return float(completion.strip() == row["answer"])
