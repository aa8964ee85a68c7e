"""examples/make_tiny_llama.py (docs/finetune.md's first step) writes a Hugging Face
directory that `run.init_from` and `nnxtrain.interop.hf.load` read, with a tokenizer whose chat
template marks the assistant's replies, and records `data=jsonl` reads with it."""

import json
import runpy
from pathlib import Path

import numpy as np

from nnxtrain import compose
from nnxtrain.data import build_dataset
from nnxtrain.interop.hf import load

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "make_tiny_llama.py"


def test_the_script_writes_a_model_and_records_a_run_can_start_from(tmp_path):
    out = tmp_path / "tiny"
    # The script's main() in this process (a subprocess would start Python and JAX again).
    runpy.run_path(str(SCRIPT), run_name="make_tiny_llama")["main"]([str(out)])
    model_dir = out / "model"
    names = {p.name for p in model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    template = json.loads((model_dir / "tokenizer_config.json").read_text())["chat_template"]
    assert "{% generation %}" in template

    model = load(str(model_dir))  # the safetensors and config.json, as init_from reads them
    logits = model(np.zeros((1, 4), np.int32))
    assert logits.shape == (1, 4, model.cfg.vocab_size)

    data_args = [f"data.path={out / 'train.jsonl'}", f"data.val_path={out / 'val.jsonl'}"]
    run_args = ["run.seq_len=128", "data.prefetch=0"]
    cfg = compose([f"run.init_from={model_dir}", "data=jsonl", *data_args, *run_args])
    assert cfg.data.tokenizer == str(model_dir / "tokenizer.json")  # the model's, not byte
    data = build_dataset(cfg)
    assert data.document_mask and data.vocab_size <= cfg.model.vocab_size
    assert len(data.train.docs) == 72 and len(data.val.docs) == 24
    batch = data.batch(0, 4, 128)
    assert 0 < batch["weights"].sum() < (batch["segment_ids"] > 0).sum()  # replies only
    # every chat record's loss ends on EOS: the reply is trained to stop
    eos_targets = (batch["targets"] == data.eos_id) & (batch["segment_ids"] > 0)
    assert batch["weights"][eos_targets].all()
