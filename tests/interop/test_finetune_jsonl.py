"""Instruction tuning end to end through the CLI's main() (in this process): a random
LlamaForCausalLM saved by transformers, with its own tokenizer, fine-tuned 30 steps with
`run.init_from=DIR data=jsonl` on prompt/completion records, then exported with
`nnxtrain-export`'s main().

- The run reads the records with DIR's tokenizer (not the byte fallback jsonl once had).
- The packed eval loss at step 0 (documents packed into rows, each attending only to
  itself, positions restarting) equals what transformers computes record by record: the
  token-weighted mean of each completion's cross-entropy under the starting weights.
- The eval loss on the completions goes down, and the exported model's loss in
  transformers is the run's final eval loss; the export loads with no missing or
  unexpected keys and gives the trained model's logits, which moved from the start's.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli_in_process
from hf_models import TOLERANCE, export_parity, hf_model, make_hf, word_tokenizer

from nnxtrain.cli.export import main as export_main

pytestmark = pytest.mark.slow

VOCAB = 48  # the model's; the tokenizer has fewer tokens (a padded vocabulary)
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
STEPS = 30


def records(n: int, seed: int) -> list[dict[str, str]]:
    """`count from A :` -> the next three numbers: a completion the prompt determines."""
    rng = np.random.default_rng(seed)
    out = []
    for a in rng.integers(0, 7, size=n):
        prompt = f"count from {WORDS[a]} :"
        out.append({"prompt": prompt, "completion": " " + " ".join(WORDS[a + 1 : a + 4])})
    return out


def write_jsonl(path: Path, recs: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("hf")
    make_hf(tmp / "model", vocab_size=VOCAB, max_position_embeddings=64)
    text = " ".join(r["prompt"] + r["completion"] for r in records(50, 0))
    tokenizer = word_tokenizer(tmp / "model" / "tokenizer.json", text)
    assert len(json.loads(tokenizer.read_text())["model"]["vocab"]) < VOCAB
    (tmp / "model" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    return tmp / "model"


def reference_loss(model_dir: Path, tokenizer: Path, recs: list[dict[str, str]]) -> float:
    """transformers, one record at a time: sum of the completion-and-EOS targets'
    cross-entropy over their count. The ids come straight from `tokenizers` (prompt and
    completion encoded apart, no special tokens, then `</s>`)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer))
    eos = tok.token_to_id("</s>")
    model, _ = hf_model(model_dir)
    ce, count = 0.0, 0
    for r in recs:
        prompt = tok.encode(r["prompt"], add_special_tokens=False).ids
        completion = tok.encode(r["completion"], add_special_tokens=False).ids
        ids = torch.tensor([prompt + completion + [eos]])
        with torch.no_grad():
            logits = model(ids[:, :-1]).logits[0].double()
        per_token = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
        counted = per_token[len(prompt) - 1 :]  # targets: the completion and the EOS
        ce, count = ce + float(counted.sum()), count + len(counted)
    return ce / count


def eval_losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["eval/loss"] for r in map(json.loads, lines) if "eval/loss" in r}


def test_sft_from_hf_on_jsonl_packs_exports_and_matches_transformers(hf_dir, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", records(120, 1))
    val_records = records(12, 2)
    val = write_jsonl(tmp_path / "val.jsonl", val_records)
    run = tmp_path / "run"
    args = [f"run.init_from={hf_dir}", "data=jsonl", f"data.path={train}"]
    args += [f"data.val_path={val}", f"run.steps={STEPS}", f"run.dir={run}", "mesh=single"]
    # 12 held-out records of 8 tokens (7 places) pack 3 to a row of 24: 4 rows, 2 batches of 2
    args += ["run.batch_size=2", "run.seq_len=24", "run.eval_every=30", "run.eval_batches=2"]
    args += ["optim.lr=3e-3", "optim.warmup_steps=3", "run.log_every=10"]
    args += ["+callbacks.eval0._target_=callbacks_for_tests.EvalAtStart"]
    done = run_cli_in_process(args, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"init_from: took the parameters of {hf_dir} in" in done.stdout
    assert "; tokenizer Hugging Face tokenizer.json (" in done.stdout  # DIR's, not bytes
    assert "document mask on" in done.stdout and "packing efficiency" in done.stdout

    losses = eval_losses(run)
    assert sorted(losses) == [0, STEPS]
    # Both sides compute each target's logits from the same weights and tokens: they agree
    # within TOLERANCE (max abs logit difference, test_hf_parity). A cross-entropy is
    # logsumexp(logits) - logit[target], and logsumexp moves by at most the largest logit
    # change: each term, and so their weighted mean, is within 2 * TOLERANCE.
    start = reference_loss(hf_dir, hf_dir / "tokenizer.json", val_records)
    print(f"step 0 eval loss: nnxtrain packed {losses[0]:.6f}, transformers {start:.6f}")
    assert abs(losses[0] - start) <= 2 * TOLERANCE
    assert losses[STEPS] < losses[0] - 0.5, losses  # learned the completions

    out = tmp_path / "hf"
    export_main([str(run), str(out)])  # the command itself: test_hf_export
    for name in ("tokenizer.json", "tokenizer_config.json"):  # the tokenizer, and its EOS
        assert (out / name).read_bytes() == (hf_dir / name).read_bytes()
    end = reference_loss(out, out / "tokenizer.json", val_records)
    print(f"step {STEPS} eval loss: nnxtrain {losses[STEPS]:.6f}, exported {end:.6f}")
    assert abs(losses[STEPS] - end) <= 2 * TOLERANCE
    # The export loads with nothing missing or unexpected, with the trained model's logits,
    # which moved away from the starting weights'.
    diff, moved = export_parity(run, out, hf_dir, VOCAB)
    print(f"init_from HF, {STEPS} steps, export: parity {diff:.2e}; moved {moved:.2e}")
    assert diff <= TOLERANCE and moved > 10 * TOLERANCE
