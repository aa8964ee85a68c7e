"""The real CLI on user data: bad input is one line naming the key and exit 2; a text run
with invalid UTF-8 warns once, evaluates, and resumes on the same batches.

Most bad-input cases call the CLI's `main()` in this process (conftest's
`run_cli_in_process`: no interpreter and JAX start per case); two run the real command in
subprocesses, concurrently, to prove the exit code and the one line end to end. The text
run calls `main()` in this process too."""

import json
import subprocess
from pathlib import Path

import pytest
from conftest import assert_one_line_error, run_cli_cases, run_cli_in_process

pytestmark = pytest.mark.slow

BASE = ["model=tiny", "run.steps=2", "run.batch_size=2", "run.seq_len=8", "run.eval_every=0"]
CORPUS = "a small corpus, long enough for a few sequences of eight bytes each.\n" * 4

# id -> (overrides, the key the error must name). "{tmp}" is the case's own directory,
# which holds corpus.txt, empty.txt, short.txt, broken.json, long.jsonl, chat.jsonl and
# bomb.jinja.
CASES = {
    "no-path": (["data=text"], "data.path"),
    "missing-path": (["data=text", "data.path={tmp}/missing.txt"], "data.path"),
    "glob-matches-nothing": (["data=text", "data.path={tmp}/*.nope"], "data.path"),
    "empty-file": (["data=text", "data.path=[{tmp}/corpus.txt,{tmp}/empty.txt]"], "data.path"),
    "shorter-than-a-sequence": (["data=text", "data.path={tmp}/short.txt"], "data.path"),
    "missing-val-path": (
        ["data=text", "data.path={tmp}/corpus.txt", "data.val_path={tmp}/nope.txt"],
        "data.val_path",
    ),
    "unreadable-tokenizer": (
        ["data=text", "data.path={tmp}/corpus.txt", "data.tokenizer={tmp}/broken.json"],
        "data.tokenizer",
    ),
    "missing-tokenizer": (
        ["data=text", "data.path={tmp}/corpus.txt", "data.tokenizer={tmp}/nope.model"],
        "data.tokenizer",
    ),
    "val-split-too-small": (
        ["data=text", "data.path={tmp}/corpus.txt", "data.val_fraction=0.02", "run.eval_every=1"],
        "data.val_fraction",
    ),
    "text-file-as-tokens": (["data=tokens", "data.path={tmp}/corpus.txt"], "data.path"),
    # no token would count for the loss: every prompt fills the row (run.seq_len=8)
    "jsonl-every-prompt-too-long": (["data=jsonl", "data.path={tmp}/long.jsonl"], "data.path"),
    "jsonl-template-over-its-limits": (
        ["data=jsonl", "data.path={tmp}/chat.jsonl", "data.chat_template={tmp}/bomb.jinja"],
        "data.chat_template",
    ),
    "model-vocab-too-small": (
        [
            "data=text",
            "data.path={tmp}/corpus.txt",
            "data.vocab_size_from_tokenizer=false",
        ],  # tiny has 64 tokens, the byte tokenizer 257
        "model.vocab_size",
    ),
}


def _files(tmp: Path) -> None:
    (tmp / "corpus.txt").write_text(CORPUS, encoding="utf-8")
    (tmp / "empty.txt").write_bytes(b"")
    (tmp / "short.txt").write_text("tiny", encoding="utf-8")
    (tmp / "broken.json").write_text('{"model": ', encoding="utf-8")
    (tmp / "long.jsonl").write_text('{"prompt": "a long prompt", "completion": "!"}\n' * 4)
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    (tmp / "chat.jsonl").write_text(json.dumps({"messages": chat}) + "\n")
    # 'x' * 2e9 once aborted the process (a Rust panic in the tokenizer)
    (tmp / "bomb.jinja").write_text("{{ 'x' * 2000000000 }}{% generation %}x{% endgeneration %}")


# Real subprocesses: one refused while the config is checked, one when the data is read.
IN_SUBPROCESS = {"no-path", "model-vocab-too-small"}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, subprocess.CompletedProcess[str]]:
    def args(case: str) -> tuple[list[str], Path]:
        tmp = tmp_path_factory.mktemp(case)
        _files(tmp)
        overrides = [o.replace("{tmp}", str(tmp)) for o in CASES[case][0]]
        return [*BASE, *overrides, f"hydra.run.dir={tmp / 'hydra'}"], tmp

    return run_cli_cases(CASES, args, IN_SUBPROCESS)


@pytest.mark.parametrize("case", list(CASES))
def test_bad_data_input_is_one_line_naming_the_key(case, results):
    assert_one_line_error(results[case], CASES[case][1], ("nnxtrain: error: ", "error: "))


def test_text_run_warns_once_evaluates_and_resumes(tmp_path):
    lines = [f"verse {i % 7}: the owl and the pussy-cat went to sea.\n" for i in range(60)]
    raw = "".join(lines).encode()
    (tmp_path / "poem.txt").write_bytes(raw[:500] + b"\xff\xfe" + raw[500:])
    run_dir = tmp_path / "run"
    args = [
        "model=tiny",
        "data=text",
        f"data.path={tmp_path}/poem.txt",
        "run.batch_size=4",
        "run.seq_len=32",
        "run.eval_every=3",
        "run.eval_batches=2",
        "run.log_every=1",
        f"hydra.run.dir={run_dir}",
    ]
    first = run_cli_in_process([*args, "run.steps=3"], tmp_path)
    assert first.returncode == 0, first.stderr
    assert "Traceback" not in first.stderr
    output = (first.stdout + first.stderr).splitlines()  # Hydra logs to stdout and cli.log
    warned = [ln for ln in output if "not valid UTF-8" in ln]
    assert len(warned) == 1 and "2 byte(s)" in warned[0] and "poem.txt" in warned[0]
    records = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval/loss" in r]
    assert [r["step"] for r in evals] == [3] and evals[0]["eval/total_weights"] > 0
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["loss_floor"] is None

    again = run_cli_in_process([*args, "run.steps=6"], tmp_path)
    assert again.returncode == 0, again.stderr
    assert "resumed from step 3" in again.stdout
    assert "dataset differs" not in again.stdout + again.stderr
    records = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval/loss" in r] == [3, 6]
