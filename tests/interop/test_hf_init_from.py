"""`run.init_from` with a Hugging Face directory, through the CLI's main() in this process: a
random Gemma 3, the family of issue 26 whose parameter tree differs most from Llama's,
fine-tuned 20 steps on a text file, exported with `nnxtrain-export`'s main() as that family
(architectures, model_type), loads in transformers with nnxtrain's logits, which moved away
from the starting weights'. Bad input is one line and exit 2. (Llama through init_from,
data=jsonl and export: test_finetune_jsonl.py; a run dir as the source, resuming, and the
shape rules: tests/unit/test_init_from.py.)
"""

import json
from pathlib import Path

import pytest
from conftest import run_cli_cases, run_cli_in_process
from hf_models import FAMILIES, TOLERANCE, export_parity, make_hf, word_tokenizer

from nnxtrain.cli.export import main as export_main

pytestmark = pytest.mark.slow

TEXT = "the cat sat on the mat . the dog sat on the log . a cat and a dog met . " * 20
VOCAB = 32  # the model's; the tokenizer has fewer tokens (a padded vocabulary, as on the Hub)
ARGS = ["mesh=single", "run.batch_size=2", "run.seq_len=16", "run.eval_every=0"]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small random Llama saved by transformers, with a tokenizer.json of TEXT's words."""
    tmp = tmp_path_factory.mktemp("hf")
    (tmp / "corpus.txt").write_text(TEXT)
    make_hf(tmp / "model", vocab_size=VOCAB, max_position_embeddings=64)
    tokenizer = word_tokenizer(tmp / "model" / "tokenizer.json", TEXT)
    assert len(json.loads(tokenizer.read_text())["model"]["vocab"]) < VOCAB
    return tmp / "model"


# Gemma 3 has the most switches that add parameters (q/k norms, four (1 + w) norms per
# layer), tied embeddings, a mixed local/global stack, its embedding scale and soft-cap.
# Each other family passes the same test (by hand, ~7 s each: test time is scarce); their
# load and export are hf.load/hf.save, which test_hf_families checks for each (and
# test_lora_peft exports a Qwen2 merged with its adapters).
INIT_FROM_FAMILIES = ["gemma3_text"]


@pytest.mark.parametrize("kind", INIT_FROM_FAMILIES)
def test_a_family_finetunes_and_exports_as_itself(hf_dir, tmp_path, kind):
    """20 steps from a tiny model of `kind` (2 layers of 32, its distinctive switches; Gemma 3
    keeps its 3 layers, so a global layer follows the sliding ones), in this process."""
    src = make_hf(
        tmp_path / kind,
        kind=kind,
        **{**FAMILIES[kind], "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 48},
        max_position_embeddings=64,
    )
    (src / "tokenizer.json").write_bytes((hf_dir / "tokenizer.json").read_bytes())
    args = [f"run.init_from={src}", "+experiment=finetune", "data=text", "run.steps=20"]
    args += [f"data.path={hf_dir.parent / 'corpus.txt'}", f"run.dir={tmp_path / 'run'}", *ARGS]
    done = run_cli_in_process(args, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    export_main([str(tmp_path / "run"), str(tmp_path / "out")])
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    original = json.loads((src / "config.json").read_text())
    assert (written["model_type"], written["architectures"]) == (kind, original["architectures"])
    diff, moved = export_parity(tmp_path / "run", tmp_path / "out", src, VOCAB)
    print(f"init_from {kind}, 20 steps, export: parity {diff:.2e}; moved {moved:.2e}")
    assert diff <= TOLERANCE and moved > 10 * TOLERANCE


def test_bad_input_is_one_line_and_exit_2(hf_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "deepseek").mkdir()  # a family nnxtrain does not read (a MoE with MLA)
    config = json.loads((hf_dir / "config.json").read_text())
    (tmp_path / "deepseek" / "config.json").write_text(
        json.dumps({**config, "model_type": "deepseek_v3"})
    )
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run_info.json").write_text("{}")
    cases = {
        "model.emb_dim: 32 conflicts with run.init_from=": [
            f"run.init_from={hf_dir}",
            "model.emb_dim=32",
        ],
        "run.init_from: ": [f"run.init_from={tmp_path}/nope"],
        "holds neither config.json": [f"run.init_from={tmp_path}/empty"],
        "has no complete checkpoint": [f"run.init_from={tmp_path}/run"],
        "config.json key 'model_type' is \"deepseek_v3\"": [f"run.init_from={tmp_path}/deepseek"],
    }
    # In this process (no interpreter and JAX start each), and one as the real command, to
    # prove the exit code and the output end to end. Each case has its own run dir: the
    # real command runs beside the others, and none may leave a run dir behind.
    names = {case: f"out{i}" for i, case in enumerate(cases)}
    results = run_cli_cases(
        cases,
        lambda case: ([*cases[case], *ARGS, f"run.dir={tmp_path / names[case]}"], tmp_path),
        in_subprocess={"model.emb_dim: 32 conflicts with run.init_from="},
    )
    for expected, done in results.items():
        assert done.returncode == 2, (expected, done.stderr[-2000:])
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], (expected, done.stderr)
    assert not [name for name in names.values() if (tmp_path / name).exists()]
