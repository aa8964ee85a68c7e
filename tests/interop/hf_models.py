"""Small random Hugging Face models (Llama, the dense families of `FAMILIES` and the
mixtures of experts of `MOE_FAMILIES`) for the interop tests (no downloads).

`make_hf(path, kind=...)` builds a `LlamaForCausalLM` (or the `kind`'s class) from a config
object, gives it weights large enough that attention is sharp and every norm scale
differs (so a rotary or norm mix-up moves the logits), and `save_pretrained`s it.
`hf_logits(path, tokens)` is what transformers computes from that directory, in float32.
`word_tokenizer(path, text)` writes a small word-level tokenizer.json for `text`.
"""

from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

BASE: dict[str, Any] = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
}
LLAMA3 = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,  # puts head_dim 16's wavelength 32.4 in the blend
}
CLASSES: dict[str, tuple[Any, Any]] = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    "gemma3_text": (Gemma3TextConfig, Gemma3ForCausalLM),
    "gemma2": (Gemma2Config, Gemma2ForCausalLM),
    "mixtral": (MixtralConfig, MixtralForCausalLM),
    "qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM),
}
TOLERANCE = 1e-4  # max abs diff of float32 logits
WINDOW = 8  # shorter than the tests' sequences and than their generations
# family beyond Llama -> make_hf overrides (issue 26), each the family's distinctive case:
# Qwen2.5's q/k/v biases, tied embeddings and rope_theta 1e6; Qwen3's q/k norms with
# head_dim 24 != 64 / 4; Mistral's sliding window.
FAMILIES: dict[str, dict[str, Any]] = {
    "mistral": {"sliding_window": WINDOW, "head_dim": 24},
    "qwen2": {
        "tie_word_embeddings": True,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
    },
    "qwen3": {"head_dim": 24, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}},
    # Gemma 3: 2 sliding layers then a global one; two rotary bases (the global one scaled);
    # query_pre_attn_scalar != head_dim; a final soft-cap; (1 + w) norms, four per layer
    "gemma3_text": {
        "num_hidden_layers": 3,
        "sliding_window_pattern": 3,
        "sliding_window": WINDOW,
        "head_dim": 24,
        "query_pre_attn_scalar": 20,
        "final_logit_softcapping": 3.0,
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
        },
    },
    # Gemma 2: alternating sliding and global layers, both soft-caps (transformers runs it
    # with eager attention, which applies the attention soft-cap)
    "gemma2": {
        "sliding_window": WINDOW,
        "head_dim": 24,
        "query_pre_attn_scalar": 20,
        "attn_logit_softcapping": 2.0,
        "final_logit_softcapping": 3.0,
    },
}
# Mixtures of experts (issue 28): 8 experts, top 2, of 48 features (Qwen3-MoE's dense layers:
# intermediate_size); Mixtral renormalises the top-2 weights and has Mistral's window,
# Qwen3-MoE (norm_topk_prob false) does not. Generation's decode steps route 3 tokens:
# at most 6 of the 8 experts get one, the rest none.
MOE_FAMILIES: dict[str, dict[str, Any]] = {
    "mixtral": {"num_local_experts": 8, "intermediate_size": 48, "sliding_window": WINDOW},
    # Qwen3-MoE with dense layers between its sparse ones: experts in layers 1 and 3 only
    # (every 2nd, but not layer 5): dense, sparse, dense, sparse, dense, dense
    "qwen3_moe": {
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 48,
        "head_dim": 24,
        "num_hidden_layers": 6,
        "decoder_sparse_step": 2,
        "mlp_only_layers": [5],
    },
}


def make_hf(
    path: Path,
    *,
    kind: str = "llama",
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | None = None,
    seed: int = 0,
    **overrides: Any,
) -> Path:
    """A random model saved with `save_pretrained` in `path`; returns `path`."""
    torch.manual_seed(seed)
    config_cls, model_cls = CLASSES[kind]
    model = model_cls(config_cls(**{**BASE, **overrides}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # Gemma's (1 + w) too: scales of 0.5 .. 2.5
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):  # Qwen2's q/k/v biases: as large as a weight's effect
                p.normal_(0.0, 0.5)
            else:
                p.normal_(0.0, 0.15)
    model = model.to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return path


def hf_model(path: Path) -> Any:
    """transformers' model of `path` in float32, and its loading info."""
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)


def hf_logits(path: Path, tokens: np.ndarray) -> np.ndarray:
    model, _ = hf_model(path)
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()


def export_parity(run_dir: Path, exported: Path, start: Path, vocab: int) -> tuple[float, float]:
    """A trained run against its export: the export loads in transformers with nothing
    missing, unexpected or mismatched (asserted); returns the max abs difference of its
    logits from the run's model's, and how far they moved from the starting model's (HF dir
    `start`), on 2 x 16 random tokens below `vocab`."""
    import jax.numpy as jnp

    from nnxtrain.checkpoint.model import read_model

    reference, info = hf_model(exported)
    assert all(not v for v in info.values()), info
    _, _, model = read_model(str(run_dir))
    toks = np.random.default_rng(0).integers(0, vocab, (2, 16), dtype=np.int32)
    with torch.no_grad():
        theirs = reference(torch.tensor(toks, dtype=torch.long)).logits.numpy()
    diff = float(np.max(np.abs(np.asarray(model(jnp.asarray(toks))) - theirs)))
    return diff, float(np.max(np.abs(theirs - hf_logits(start, toks))))


def tokens(length: int, batch: int = 2, vocab: int = BASE["vocab_size"]) -> np.ndarray:
    return np.random.default_rng(length).integers(0, vocab, (batch, length), dtype=np.int32)


def tensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of the safetensors files in `path`, by name."""
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="numpy") as f:
            for name in f.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                out[name] = f.get_tensor(name)
    return out


def word_tokenizer(path: Path, text: str) -> Path:
    """A word-level tokenizer.json of the words of `text`, with [UNK] and </s>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([text], trainers.WordLevelTrainer(special_tokens=["[UNK]", "</s>"]))
    tok.save(str(path))
    return path
