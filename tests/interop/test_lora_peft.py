"""LoRA adapters that PEFT and transformers load exactly (issue 25), on a tiny random Llama
with non-square projections (GQA k/v 32 x 64, MLP 96 vs 64) and alpha/r = 1.5:

- nnxtrain's adapters with random, non-zero B, written as PEFT's files: `PeftModel` loads
  them with warnings as errors and gives our logits (and not the base's), and the keys and
  shapes are exactly those PEFT saves for the same LoraConfig;
- the merged export equals PEFT's `merge_and_unload()`, untargeted tensors bitwise the
  base's; both with alpha/r and with rsLoRA's alpha/sqrt(r); both also on a Qwen2 base
  (q/k/v biases, tied embeddings) and a Gemma 3 one (four (1 + w) norms per layer, q/k
  norms, sliding and global layers), issue 26;
- a run trained through the CLI (its embeddings too) exports with `--adapter` (the
  embeddings as PEFT's `modules_to_save`) and `--merge` to the same logits; tied
  embeddings export as PEFT writes them with `ensure_weight_tying`;
- a PEFT adapter read in gives PEFT's logits and greedy tokens (also through
  `nnxtrain-generate --adapter`), and training continues from it;
- an adapter with an option nnxtrain cannot represent, or for another base, is one line.
"""

import json
import shutil
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, run_cli_in_process
from flax import nnx
from hf_models import FAMILIES, TOLERANCE, make_hf, tensors, tokens, word_tokenizer
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from rich.console import Console
from transformers import AutoModelForCausalLM, PreTrainedModel

import nnxtrain.hf
from nnxtrain import generate
from nnxtrain.checkpoint.model import read_model
from nnxtrain.cli.export import _load_base
from nnxtrain.cli.export import main as export_main
from nnxtrain.cli.generate import main as generate_main
from nnxtrain.config import LORA_TARGETS
from nnxtrain.config import LoraConfig as OurLora
from nnxtrain.interop.peft import attach_adapter, merged, save_adapter
from nnxtrain.model import Transformer

pytestmark = pytest.mark.slow

R, ALPHA = 4, 6.0
TOKENS = tokens(12)
QUIET = Console(quiet=True)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_hf(tmp_path_factory.mktemp("lora") / "base")


@pytest.fixture(scope="module")
def bases(base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The base of each kind the parity test runs on (the families' with their switches)."""
    root = tmp_path_factory.mktemp("families")
    kinds = ("qwen2", "gemma3_text")
    return {"llama": base} | {k: make_hf(root / k, kind=k, **FAMILIES[k]) for k in kinds}


def hf_base(path: Path) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def torch_logits(model: torch.nn.Module, toks: np.ndarray = TOKENS) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(toks, dtype=torch.long)).logits.numpy()


@jax.jit
def ours(model: Transformer, toks: jax.Array) -> jax.Array:
    return model(toks)


def strict_peft(base: Path, adapter: Path) -> PeftModel:
    """PeftModel.from_pretrained with every warning an error: a key PEFT does not know
    (a wrong prefix, which it loads with one warning, B left at zero) fails here."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # transformers 5.25 deprecates a property that peft 0.21.2 reads: not ours.
        warnings.filterwarnings("ignore", ".*is_gradient_checkpointing.*", FutureWarning)
        return PeftModel.from_pretrained(hf_base(base), str(adapter))


@pytest.mark.parametrize(
    ("kind", "rslora"),
    [("llama", False), ("llama", True), ("qwen2", False), ("gemma3_text", False)],
    ids=["alpha_over_r", "rslora", "qwen2", "gemma3_text"],
)
def test_adapter_and_merged_exports_equal_peft(bases, tmp_path, kind, rslora) -> None:
    base = bases[kind]
    plain = nnxtrain.hf.load(str(base))
    lora = OurLora(rank=R, alpha=ALPHA, use_rslora=rslora, targets=list(LORA_TARGETS))
    model = attach_adapter_config(plain, lora)
    randomize(model)
    expected = np.asarray(ours(model, jnp.asarray(TOKENS)))

    save_adapter(model, str(tmp_path / "adapter"), str(base))
    peft_model = strict_peft(base, tmp_path / "adapter")
    theirs = torch_logits(peft_model)
    diff = float(np.abs(theirs - expected).max())
    print(f"parity PEFT adapter ({kind}, rslora={rslora}): max abs diff {diff:.2e}")
    assert diff <= TOLERANCE
    assert not np.allclose(torch_logits(hf_base(base)), expected, atol=1e-2)  # not the base

    config = LoraConfig(r=R, lora_alpha=ALPHA, use_rslora=rslora, target_modules=list(LORA_TARGETS))
    reference = get_peft_model_state_dict(get_peft_model(hf_base(base), config))
    saved = tensors(tmp_path / "adapter")
    assert {k: tuple(v.shape) for k, v in saved.items()} == {
        k: tuple(v.shape) for k, v in reference.items()
    }

    nnxtrain.hf.save(merged(model), str(tmp_path / "merged"))
    theirs_merged = peft_model.merge_and_unload().state_dict()
    written, original = tensors(tmp_path / "merged"), tensors(base)
    # the base's names (a tied base's state_dict also lists lm_head, which it does not save)
    assert set(written) == set(original) and set(written) <= set(theirs_merged)
    worst = max(float(np.abs(written[k] - theirs_merged[k].numpy()).max()) for k in written)
    print(f"parity merged vs merge_and_unload ({kind}, rslora={rslora}): max abs diff {worst:.2e}")
    assert worst <= 1e-6
    for name in written:  # LoRA did not touch these: the base's, bit for bit
        if not name.endswith(tuple(f"{t}.weight" for t in LORA_TARGETS)):
            assert np.array_equal(written[name], original[name]), name
    merged_logits = torch_logits(hf_base(tmp_path / "merged"))
    assert float(np.abs(merged_logits - expected).max()) <= TOLERANCE


def randomize(model: Transformer) -> None:
    """B (and A) random, non-zero: every adapter matters."""
    for i, (_, var) in enumerate(nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))):
        value = var.get_value()
        var.set_value(jax.random.normal(jax.random.key(i), value.shape, value.dtype) * 0.2)


def attach_adapter_config(plain: Transformer, lora: OurLora) -> Transformer:
    """`plain` with fresh adapters of `lora` (A as PEFT's init, B zero)."""
    import dataclasses

    cfg = dataclasses.replace(plain.cfg, lora=lora)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    nnx.update(model, nnx.state(plain, nnx.Param))
    return model


def test_trained_tied_embeddings_export_as_peft_modules_to_save(tmp_path) -> None:
    tied = make_hf(tmp_path / "tied", tie_word_embeddings=True)
    plain = nnxtrain.hf.load(str(tied))
    lora = OurLora(rank=R, alpha=ALPHA, targets=["q_proj"], train_embeddings=True)
    model = attach_adapter_config(plain, lora)
    randomize(model)
    embed = model.embed.get_value()  # trained: no longer the base's
    model.embed.set_value(embed + jax.random.normal(jax.random.key(9), embed.shape) * 0.5)
    expected = np.asarray(ours(model, jnp.asarray(TOKENS)))
    save_adapter(model, str(tmp_path / "adapter"), str(tied))
    theirs = torch_logits(strict_peft(tied, tmp_path / "adapter"))
    assert float(np.abs(theirs - expected).max()) <= TOLERANCE
    assert not np.allclose(torch_logits(hf_base(tied)), expected, atol=1e-2)
    config = LoraConfig(
        r=R,
        lora_alpha=ALPHA,
        target_modules=["q_proj"],
        modules_to_save=list(EMBEDDINGS),
        ensure_weight_tying=True,
    )
    reference = get_peft_model_state_dict(get_peft_model(hf_base(tied), config))
    saved = tensors(tmp_path / "adapter")
    assert {k: v.shape for k, v in saved.items()} == {
        k: tuple(v.shape) for k, v in reference.items()
    }


RUN = ["run.batch_size=4", "run.seq_len=16", "run.eval_every=0", "optim.warmup_steps=0"]


EMBEDDINGS = ("embed_tokens", "lm_head")  # PEFT extends the list it is given: copied


def test_a_cli_run_exports_to_peft_and_merged_with_its_logits(base, tmp_path) -> None:
    # model.lora.train_embeddings: the adapter carries them as PEFT's modules_to_save
    args = [*RUN, "run.steps=3", f"run.init_from={base}", "model.lora.rank=4"]
    args += ["model.lora.alpha=6", "model.lora.targets=[q_proj,k_proj,v_proj,down_proj]"]
    args += ["model.lora.train_embeddings=true"]
    done = run_cli_in_process([*args, "optim.lr=0.05", f"run.dir={tmp_path / 'run'}"], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    for flag in ("--adapter", "--merge"):
        export_main([str(tmp_path / "run"), str(tmp_path / flag[2:]), flag])
    _, _, model = read_model(str(tmp_path / "run"), load_base=_load_base)
    expected = np.asarray(ours(model, jnp.asarray(TOKENS)))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base)
    assert config["target_modules"] == ["q_proj", "k_proj", "v_proj", "down_proj"]
    assert config["modules_to_save"] == list(EMBEDDINGS)
    peft_config = LoraConfig(
        r=4, lora_alpha=6, target_modules=config["target_modules"], modules_to_save=list(EMBEDDINGS)
    )
    reference = get_peft_model_state_dict(get_peft_model(hf_base(base), peft_config))
    saved = tensors(tmp_path / "adapter")
    assert {k: v.shape for k, v in saved.items()} == {
        k: tuple(v.shape) for k, v in reference.items()
    }
    assert not np.array_equal(
        saved["base_model.model.lm_head.weight"], tensors(base)["lm_head.weight"]
    )
    assert (
        float(np.abs(torch_logits(strict_peft(base, tmp_path / "adapter")) - expected).max())
        <= TOLERANCE
    )
    assert float(np.abs(torch_logits(hf_base(tmp_path / "merge")) - expected).max()) <= TOLERANCE
    assert not np.allclose(torch_logits(hf_base(base)), expected, atol=1e-2)  # it trained
    # and read back (model.lora.adapter, nnxtrain-generate --adapter): the same float32
    # arrays on the same base, so the same logits bit for bit
    back = attach_adapter(nnxtrain.hf.load(str(base)), str(tmp_path / "adapter"), QUIET)
    assert np.array_equal(np.asarray(ours(back, jnp.asarray(TOKENS))), expected)


@pytest.fixture(scope="module")
def peft_adapter(base, tmp_path_factory) -> Path:
    """A PEFT adapter made by PEFT, with random B, on q/v/o/up_proj."""
    torch.manual_seed(0)
    config = LoraConfig(
        r=R, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj", "o_proj", "up_proj"]
    )
    model = get_peft_model(hf_base(base), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)
    out = tmp_path_factory.mktemp("peft") / "adapter"
    model.save_pretrained(out)
    return out


def test_a_peft_adapter_reads_in_with_peft_logits_and_training_continues(
    base, peft_adapter, tmp_path, capsys
) -> None:
    model = attach_adapter(nnxtrain.hf.load(str(base)), str(peft_adapter), QUIET)
    peft_model = strict_peft(base, peft_adapter)
    theirs = torch_logits(peft_model)
    assert float(np.abs(np.asarray(ours(model, jnp.asarray(TOKENS))) - theirs).max()) <= TOLERANCE
    # Generation with the adapter: greedy tokens equal PEFT's (up to its first EOS, where
    # transformers stops), through the Python API and nnxtrain-generate --adapter.
    prompt = TOKENS[:1, :6]
    got = np.asarray(generate(model, prompt, max_new_tokens=8))[0]
    with torch.no_grad():
        ids = torch.tensor(prompt, dtype=torch.long)
        out = peft_model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False
        )[0, 6:].numpy()
    assert len(out) >= 1 and np.array_equal(got[: len(out)], out)
    with_tokenizer = tmp_path / "base_tok"
    shutil.copytree(base, with_tokenizer)
    word_tokenizer(with_tokenizer / "tokenizer.json", "the cat sat on the mat")
    generate_main([str(with_tokenizer), "--adapter", str(peft_adapter), "--prompt", "the cat"])
    assert "tokens in" in capsys.readouterr().err

    args = [*RUN, "run.steps=2", "optim.lr=1e-3", f"run.init_from={base}"]
    args += [f"model.lora.adapter={peft_adapter}", f"run.dir={tmp_path / 'run'}"]
    done = run_cli_in_process(args, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"lora: took the adapters of {peft_adapter}" in done.stdout
    export_main([str(tmp_path / "run"), str(tmp_path / "out"), "--adapter"])
    before, after = tensors(peft_adapter), tensors(tmp_path / "out")
    assert set(before) == set(after)
    moved = max(float(np.abs(after[k] - before[k]).max()) for k in before)
    assert 0 < moved < 0.05  # two small steps from PEFT's B (~0.2), not from a fresh zero


def test_unsupported_or_mismatched_adapters_are_one_line(base, peft_adapter, tmp_path) -> None:
    dora = tmp_path / "dora"
    shutil.copytree(peft_adapter, dora)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    heads = tmp_path / "heads"  # modules PEFT trains in full: the embeddings only
    shutil.copytree(peft_adapter, heads)
    (heads / "adapter_config.json").write_text(json.dumps({**config, "modules_to_save": ["score"]}))
    other = make_hf(tmp_path / "other", intermediate_size=128)
    cases = {
        "dora": (base, dora, "use_dora"),
        "heads": (base, heads, "modules_to_save"),
        "other base": (other, peft_adapter, "does not fit"),
    }
    for name, (model_dir, adapter, key) in cases.items():
        args = [*RUN, "run.steps=1", f"run.init_from={model_dir}", f"model.lora.adapter={adapter}"]
        proc = run_cli_in_process([*args, f"run.dir={tmp_path / name}"], tmp_path)
        assert_one_line_error(proc, key)
