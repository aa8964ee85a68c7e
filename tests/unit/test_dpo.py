"""DPO inside nnxtrain (data=preference): the loss where policy = reference, the frozen
reference (held, LoRA's adapters off, precomputed, another model by path), the pairs read
from jsonl, resume after SIGTERM, and bad input. The numbers against TRL:
tests/interop/test_dpo_trl.py."""

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_one_line_error, run_cli_cases, run_cli_in_process
from flax import nnx

from nnxtrain import Callback, Trainer, compose
from nnxtrain.checkpoint import open_manager
from nnxtrain.checkpoint.storage import read_meta
from nnxtrain.data.preference import PairReader, PreferenceData
from nnxtrain.data.tokenizer import ByteTokenizer
from nnxtrain.errors import ConfigError
from nnxtrain.interop.hf import save
from nnxtrain.model import Transformer, adapters_off
from nnxtrain.prefs import pair_sums, row_logps

LOG2 = np.float32(math.log(2))
SIZES = [("2+3=", "5", "6"), ("10+20=", "30", "31x"), ("7+7=", "14", "144444")]


def write_pairs(path: Path, n: int = 24) -> Path:
    rng = np.random.default_rng(0)
    with path.open("w") as f:
        for _ in range(n):
            a, b = (int(x) for x in rng.integers(0, 50, 2))
            wrong = str(a + b + int(rng.integers(1, 9))) + "x" * int(rng.integers(0, 4))
            f.write(json.dumps({"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": wrong}))
            f.write("\n")
    return path


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_pairs(tmp_path_factory.mktemp("pairs") / "pairs.jsonl")


def args(pairs: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "model=tiny",
        "+experiment=dpo",
        f"data.path={pairs}",
        "mesh=single",
        "run.batch_size=4",
        "run.seq_len=16",
        "run.log_every=1",
        "optim.lr=3e-3",
        "optim.warmup_fraction=0",
        "optim.warmup_steps=0",
        "run.eval_every=0",
        f"run.dir={run_dir}",
        *extra,
    ]


class Records(Callback):
    """Keeps every step's metrics."""

    def __init__(self) -> None:
        self.metrics: list[dict[str, float]] = []

    def on_step_end(self, trainer: Any, event: Any) -> None:
        self.metrics.append(dict(event.record().metrics))


def fit(argv: list[str]) -> tuple[Trainer, Records]:
    records = Records()
    trainer = Trainer(compose([*argv, "callbacks=none"]), [records])
    trainer.fit()
    return trainer, records


def test_policy_equal_to_reference_gives_exactly_log_2() -> None:
    logps = jnp.asarray([-3.5, -7.25, -1.0, -9.0], jnp.float32)
    lengths = jnp.asarray([2.0, 3.0, 1.0, 4.0])
    sums = pair_sums(logps, logps, lengths, beta=0.1)
    assert sums["ce"] / sums["weight"] == LOG2  # exactly: every margin is 0
    assert float(sums["rewards/margins"]) == 0.0 and float(sums["rewards/accuracies"]) == 0.0


LOGPS = jax.jit(row_logps)  # (model, batch) -> each row's reply log-prob


def start_model(trainer: Trainer, lora: bool) -> Transformer:
    """The run's starting model (fresh, its seed); with LoRA the base model alone (rank
    0: no adapter at all)."""
    cfg = trainer.config.model
    if lora:
        cfg = dataclasses.replace(cfg, lora=type(cfg.lora)())
    return nnx.jit(lambda: Transformer(cfg, rngs=nnx.Rngs(trainer.config.run.seed)))()


@pytest.mark.parametrize("kind,extra", [("held", []), ("lora", ["model.lora.rank=4"])])
def test_the_reference_stays_the_starting_model(pairs, tmp_path, kind, extra):
    trainer, records = fit(args(pairs, tmp_path / kind, "run.steps=3", *extra))
    first, last = records.metrics[0], records.metrics[-1]
    assert first["loss"] == LOG2, first  # step 1: the policy is the reference, bit for bit
    assert first["rewards/margins"] == 0.0
    assert last["loss"] != LOG2 and last["rewards/margins"] != 0.0  # the policy moved
    assert trainer.state is not None and trainer.feed is not None
    start, batch = start_model(trainer, kind == "lora"), trainer.feed.train(0)
    policy = nnx.merge(trainer.graphdef, trainer.state.params)
    if kind == "held":  # the held copy is bitwise the starting weights after 3 steps
        reference = nnx.merge(trainer.graphdef, trainer.compiled.reference)
        pairs_of_leaves = zip(
            jax.tree.leaves(nnx.state(reference)), jax.tree.leaves(nnx.state(start)), strict=True
        )
        assert all(np.array_equal(a, b) for a, b in pairs_of_leaves)
    else:  # LoRA: the trained model with its adapters off
        reference = adapters_off(policy)
    expected = LOGPS(start, batch)
    assert np.array_equal(LOGPS(reference, batch), expected)  # the starting model's, bitwise
    assert not np.allclose(LOGPS(policy, batch), expected, atol=1e-4)


def test_a_reference_given_by_path_is_that_model(pairs, tmp_path):
    """dpo.reference=HF dir: another model of the policy's shape (another seed) is the
    reference, read through run.init_from's loader: its log-probs are that model's, bitwise."""
    shape = compose(args(pairs, tmp_path / "run")).model  # its vocabulary: the tokenizer's
    shape = dataclasses.replace(shape, vocab_size=ByteTokenizer().vocab_size)
    other = Transformer(shape, rngs=nnx.Rngs(7))
    save(other, str(tmp_path / "ref"))
    run = args(pairs, tmp_path / "run", "run.steps=2", f"dpo.reference={tmp_path / 'ref'}")
    trainer, records = fit(run)
    assert records.metrics[0]["loss"] != LOG2  # the policy (seed 0) is not the reference
    assert trainer.feed is not None and trainer.compiled is not None
    reference = nnx.merge(trainer.graphdef, trainer.compiled.reference)
    batch = trainer.feed.train(0)
    assert np.array_equal(LOGPS(reference, batch), LOGPS(other, batch))


def test_pairs_are_read_limited_counted_and_laid_out_chosen_then_rejected(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in SIZES]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = ByteTokenizer()
    reader = PairReader(tok, seq_len=10, max_prompt=5, max_reply=4)
    got = reader.read([str(path)], "data.path")
    # "10+20=" keeps its last 5 bytes; "144444" + EOS its first 4; "7+7=" + 4 = 8 <= 11
    assert bytes(got.prompts[1].tolist()) == b"0+20="
    assert got.rejected[2].tolist() == list(b"1444")
    assert reader.cut["prompts"] == 1 and reader.cut["replies"] == 1
    assert "1 prompts cut to data.max_prompt_len" in reader.report()
    data = PreferenceData(
        got,
        seq_len=10,
        seed=0,
        shuffle=False,
        eos_id=tok.eos_id,
        vocab_size=tok.vocab_size,
        tokenizer="byte",
        tokenizer_digest="",
        prefetch=0,
        summary="",
    )
    batch = data.batch(0, 6, 10)  # 3 pairs: rows 0-2 chosen, 3-5 rejected
    for i, (prompt, chosen, rejected) in enumerate(
        zip(got.prompts, got.chosen, got.rejected, strict=True)
    ):
        for row, reply in ((i, chosen), (i + 3, rejected)):
            n = len(prompt) + len(reply) - 1  # targets of the row
            weights = batch["weights"][row]
            assert weights.sum() == len(reply) and weights[len(prompt) - 1 : n].all()
            assert batch["targets"][row, len(prompt) - 1 : n].tolist() == reply.tolist()
    rows = [(p, c) for p, c in zip(got.prompts, got.chosen, strict=True)]
    rows += [(p, r) for p, r in zip(got.prompts, got.rejected, strict=True)]
    targets = [len(p) + len(reply) - 1 for p, reply in rows]
    assert data.count_tokens(0, 6, 10) == sum(targets)
    tight = PairReader(tok, seq_len=5, truncate="right")
    assert len(tight.read([str(path)], "data.path")) == 2
    assert tight.cut["to fit"] == 1 and tight.cut["dropped"] == 1  # "10+20=" leaves no room


def test_chat_pairs_go_through_the_template_and_the_reply_follows_the_prompt(tmp_path):
    path = tmp_path / "chat.jsonl"
    prompt = [{"role": "user", "content": "2+3?"}]
    record = {"prompt": prompt, "chosen": [{"role": "assistant", "content": "5"}], "rejected": "6!"}
    path.write_text(json.dumps(record) + "\n")
    tok = ByteTokenizer()
    reader = PairReader(tok, seq_len=64, chat_template="default")
    got = reader.read([str(path)], "data.path")
    assert "1 pairs (1 chat)" in reader.report()
    text = bytes(int(x) for x in got.prompts[0] if x < 256).decode()
    assert text.endswith("2+3?\n<|assistant|>\n")  # the generation prompt ends the prompt
    assert got.chosen[0].tolist() == [*b"5", tok.eos_id, *b"\n"]  # the reply, end of turn
    assert got.rejected[0].tolist() == [*b"6!", tok.eos_id, *b"\n"]  # a string: a message


def saved(run_dir: Path, step: int) -> dict:
    mngr = open_manager(str(run_dir / "checkpoints"), read_only=True)
    try:
        meta, _ = read_meta(mngr, step)
    finally:
        mngr.close()
    return meta["digests"]["arrays"]


@pytest.mark.slow  # three real CLI runs
def test_resume_after_sigterm_is_bitwise(pairs, tmp_path):
    """With the reference precomputed: the resumed run rebuilds the reference (as the
    held one is rebuilt) and recomputes the log-probs of its remaining steps and of the
    held-out pairs, evaluated every 2 steps."""
    extra = ["run.steps=4", "callbacks.checkpoint.every=2", "dpo.precompute_ref=true"]
    extra += ["run.eval_every=2", "run.eval_batches=1"]
    base = args(pairs, tmp_path, *extra)
    signal = ["+callbacks.sig._target_=callbacks_for_tests.SignalAtStep", "+callbacks.sig.at=2"]
    whole = run_cli_in_process([*base, f"run.dir={tmp_path / 'whole'}"], tmp_path)
    cut = run_cli_in_process([*base, *signal, f"run.dir={tmp_path / 'cut'}"], tmp_path)
    assert whole.returncode == 0 and cut.returncode == 143, cut.stderr
    again = run_cli_in_process([*base, f"run.dir={tmp_path / 'cut'}"], tmp_path)
    assert again.returncode == 0 and "resumed from step 2" in again.stdout, again.stderr
    assert "precomputed the reference log-probs of 2 steps and of 1 held-out" in again.stdout
    lines = (tmp_path / "cut" / "metrics.jsonl").open()
    records = [r for line in lines if "grad_norm" in (r := json.loads(line))]  # train steps
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[0]["loss"] == LOG2 and records[0]["rewards/margins"] == 0.0
    assert saved(tmp_path / "whole", 4) == saved(tmp_path / "cut", 4)  # bitwise
    evals = [
        json.loads(p.read_text())["final"]["eval_metrics"]
        for p in (tmp_path / "whole" / "run_info.json", tmp_path / "cut" / "run_info.json")
    ]
    assert evals[0] == evals[1] and evals[0]["eval/total_weights"] > 0
    assert 0 <= evals[0]["eval/rewards/accuracies"] <= 1


BAD_ROWS = {
    "invalid JSON": "{not json",
    "no 'rejected' field": json.dumps({"prompt": "a", "chosen": "b"}),
    "'chosen' must be a string, got a number": json.dumps(
        {"prompt": "a", "chosen": 3, "rejected": "c"}
    ),
    "'chosen' is empty": json.dumps({"prompt": "a", "chosen": "", "rejected": "c"}),
    "'prompt' must be a string or an array of messages, got an object": json.dumps(
        {"prompt": {"role": "user"}, "chosen": "b", "rejected": "c"}
    ),
}
BAD_KEYS = {
    "dpo.loss_type": ["dpo.loss_type=hinge"],
    "dpo.beta": ["dpo.beta=0"],
    "dpo.label_smoothing": ["dpo.label_smoothing=0.5"],
    "dpo.label_smoothing ": ["dpo.loss_type=ipo", "dpo.label_smoothing=0.1"],
    "data.max_prompt_len": ["data.max_prompt_len=-1"],
    "dpo.reference": ["dpo.reference=/no/such/dir"],
    "data.truncate": ["data.truncate=error", "run.seq_len=8"],
}


# Through the real command (one line, exit 2): a bad row, a bad key, a reference that is
# not there (found at compile time); the others' one line is checked where it is raised.
CLI_CASES = ("invalid JSON", "dpo.loss_type", "dpo.reference")


def test_bad_rows_and_keys_are_one_line_and_exit_2(pairs, tmp_path):
    files = {}
    for i, (why, line) in enumerate(BAD_ROWS.items()):
        files[why] = tmp_path / f"bad{i}.jsonl"
        files[why].write_text(
            json.dumps({"prompt": "1", "chosen": "2", "rejected": "3"}) + "\n" + line + "\n"
        )

    def args_of(case: str) -> tuple[list[str], Path]:
        if case in BAD_ROWS:
            return args(files[case], tmp_path / "r", "run.steps=1"), tmp_path
        return args(pairs, tmp_path / "r", "run.steps=1", *BAD_KEYS[case]), tmp_path

    done = run_cli_cases(CLI_CASES, args_of, in_subprocess=())
    for case, proc in done.items():
        assert_one_line_error(proc, "data.path" if case in BAD_ROWS else case)
        print(proc.stderr.strip())
    assert "bad0.jsonl:2: invalid JSON" in done["invalid JSON"].stderr
    for why, path in files.items():
        with pytest.raises(ConfigError) as e:
            PairReader(ByteTokenizer(), seq_len=16).read([str(path)], "data.path")
        line = str(e.value)
        assert line.startswith(f"data.path: {path}:2: {why}") and "Fix: " in line, line
        assert "\n" not in line
    for key, extra in BAD_KEYS.items():
        if key not in CLI_CASES:
            argv = args(pairs, tmp_path / "r", "run.steps=1", *extra)
            with pytest.raises(ConfigError) as e:
                Trainer(compose(argv)) if key == "data.truncate" else compose(argv)
            assert str(e.value).startswith(f"{key.strip()}: ") and "Fix: " in str(e.value)
