"""A config.json key that is absent, or null, means what it means to transformers, family by
family (issue 24: a Mistral config without `sliding_window` is a 4096-token window to
transformers, and nnxtrain read it as none).

One row per key nnxtrain reads (`nnxtrain.interop.hf.keys.DEFAULTS`) and family: a full
config.json with that key taken out (or set to null) is given to transformers' config class
and to nnxtrain. Where transformers refuses it, nnxtrain refuses it naming the key; where
transformers reads something nnxtrain cannot run (a sliding window, a bias, another
activation), nnxtrain refuses it naming the key; otherwise both read the same numbers.
Config objects only: no model is built.
"""

from typing import Any

import pytest
from transformers import (
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    Qwen2Config,
    Qwen3Config,
    Qwen3MoeConfig,
)

from nnxtrain.config import MoeConfig
from nnxtrain.errors import UserError
from nnxtrain.interop.hf.config import to_model_config
from nnxtrain.interop.hf.keys import DEFAULTS, NULLABLE

CLASSES = {
    "llama": LlamaConfig,
    "mistral": MistralConfig,
    "qwen2": Qwen2Config,
    "qwen3": Qwen3Config,
    "gemma3_text": Gemma3TextConfig,
    "gemma2": Gemma2Config,
    "mixtral": MixtralConfig,
    "qwen3_moe": Qwen3MoeConfig,
}
# Every key present, none at its default, so that taking one out changes something.
FULL: dict[str, Any] = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 16,  # Mistral's default num_key_value_heads, 8, divides it
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
    "initializer_range": 0.05,
    "rope_theta": 5e5,
    "hidden_act": "silu",
}
FAMILY_KEYS = {
    "llama": {"attention_bias": False, "mlp_bias": False},
    "mistral": {"sliding_window": None},
    # Qwen's window is off without use_sliding_window, whatever sliding_window says
    "qwen2": {"use_sliding_window": False, "sliding_window": 64},
    "qwen3": {"attention_bias": False, "use_sliding_window": False, "sliding_window": 64},
    "gemma3_text": {
        "hidden_activation": "gelu_pytorch_tanh",
        "attention_bias": False,
        "query_pre_attn_scalar": 16,
        "sliding_window": 64,
        "rope_local_base_freq": 2e4,
        "final_logit_softcapping": 30.0,
        "attn_logit_softcapping": 50.0,
    },
}
FAMILY_KEYS["mixtral"] = {
    "sliding_window": 64,
    "num_local_experts": 4,
    "num_experts_per_tok": 3,
    "router_aux_loss_coef": 0.01,
    "router_jitter_noise": 0.0,  # anything else is refused: nnxtrain's router has no jitter
}
FAMILY_KEYS["qwen3_moe"] = {
    **FAMILY_KEYS["qwen3"],
    "decoder_sparse_step": 1,  # anything else means dense layers, refused
    "moe_intermediate_size": 40,
    "num_experts_per_tok": 3,
    "num_experts": 4,
    "norm_topk_prob": True,
    "router_aux_loss_coef": 0.01,
    "mlp_only_layers": [],
}
FAMILY_KEYS["gemma2"] = {
    k: v for k, v in FAMILY_KEYS["gemma3_text"].items() if k != "rope_local_base_freq"
}
GEMMA_LACKS = ("hidden_act",)  # Gemma's activation key is hidden_activation
# ModelConfig field -> what it must be, read off transformers' config object
EXPECTED = {
    "vocab_size": lambda c: c.vocab_size,
    "emb_dim": lambda c: c.hidden_size,
    "mlp_dim": lambda c: c.intermediate_size,
    "num_layers": lambda c: c.num_hidden_layers,
    "num_heads": lambda c: c.num_attention_heads,
    "num_kv_heads": lambda c: c.num_key_value_heads,
    # Qwen2Config has no head_dim field: its attention takes hidden / heads without one
    "head_dim": lambda c: getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
    "max_len": lambda c: c.max_position_embeddings,
    "norm_eps": lambda c: c.rms_norm_eps,
    "tie_embeddings": lambda c: c.tie_word_embeddings,
    "init_std": lambda c: c.initializer_range,
    "rope_theta": lambda c: _global_rope(c)["rope_theta"],
    "sliding_window": lambda c: getattr(c, "sliding_window", None) or 0,
    "moe": lambda c: (
        MoeConfig(
            experts=c.num_local_experts,  # Qwen3-MoE's num_experts is an alias of it
            top_k=c.num_experts_per_tok,
            mlp_dim=getattr(c, "moe_intermediate_size", 0),
            norm_topk_prob=getattr(c, "norm_topk_prob", True),  # Mixtral: always
            aux_loss_coef=c.router_aux_loss_coef,
        )
        if c.model_type in ("mixtral", "qwen3_moe")
        else MoeConfig()
    ),
}


def _global_rope(c: Any) -> dict[str, Any]:
    """The rotary parameters of the global layers (Gemma 3 keeps one dict per layer type)."""
    return c.rope_parameters.get("full_attention") or c.rope_parameters


# config.json key -> whether transformers' value of it is one nnxtrain's decoder runs
RUNNABLE = {
    "num_experts_per_tok": lambda c: (
        getattr(c, "num_experts_per_tok", 1) <= getattr(c, "num_local_experts", 1)
    ),
    "router_jitter_noise": lambda c: not getattr(c, "router_jitter_noise", 0.0),
    "decoder_sparse_step": lambda c: getattr(c, "decoder_sparse_step", 1) == 1,
    "mlp_only_layers": lambda c: not getattr(c, "mlp_only_layers", None),
    "hidden_act": lambda c: getattr(c, "hidden_act", "silu") == "silu",
    "hidden_activation": lambda c: (
        getattr(c, "hidden_activation", "x") == "gelu_pytorch_tanh"
        or c.model_type not in ("gemma3_text", "gemma2")
    ),
    # Qwen's default 32 kv heads do not divide FULL's 16 query heads: transformers' config
    # takes that, its attention cannot run it
    "num_key_value_heads": lambda c: c.num_attention_heads % c.num_key_value_heads == 0,
    "attention_bias": lambda c: not getattr(c, "attention_bias", False),
    "mlp_bias": lambda c: not getattr(c, "mlp_bias", False),
    # Mistral's window runs (every layer), Gemma's (layer_types) too; Qwen's does not
    "sliding_window": lambda c: (
        c.model_type in ("mistral", "gemma3_text", "gemma2", "mixtral")
        or getattr(c, "sliding_window", None) is None
    ),
    # transformers keeps a null rope_theta, and fails when the model computes with it
    "rope_theta": lambda c: _global_rope(c)["rope_theta"] is not None,
    "rope_local_base_freq": lambda c: (
        (c.rope_parameters.get("sliding_attention") or {"x": 1}).get("rope_theta", 1) is not None
    ),
}
CASES = [
    (family, key, how)
    for family in sorted(DEFAULTS)
    for key in sorted(DEFAULTS[family])
    for how in ("absent", "null")
]


def _compare(family: str, key: str, config: dict[str, Any]) -> None:
    try:
        theirs = CLASSES[family](**config)
    except Exception:  # transformers refuses it (a strict type check, say)
        theirs = None
    try:
        ours = to_model_config({**config, "model_type": family}, "m", param_dtype="float32")
    except UserError as e:
        assert f"config.json key '{key}'" in str(e), str(e)
        assert theirs is None or not RUNNABLE.get(key, lambda c: True)(theirs), str(e)
        return
    assert theirs is not None, f"transformers refuses {key}, nnxtrain read it"
    assert all(ok(theirs) for ok in RUNNABLE.values()), f"{key}: nnxtrain cannot run it"
    got = {field: getattr(ours, field) for field in EXPECTED}
    assert got == {field: value(theirs) for field, value in EXPECTED.items()}


@pytest.mark.parametrize("family, key, how", CASES)
def test_an_absent_or_null_key_reads_as_transformers_reads_it(family, key, how):
    config = {**FULL, **FAMILY_KEYS[family]}
    if family in ("gemma3_text", "gemma2"):
        for key_ in GEMMA_LACKS:
            config.pop(key_)
    if how == "absent":
        config.pop(key)
    else:
        config[key] = None
    _compare(family, key, config)


def test_the_table_holds_what_the_config_classes_declare():
    """DEFAULTS and NULLABLE, read off transformers' dataclass fields (rope_theta is no
    field: transformers' default_theta)."""
    for family, cls in CLASSES.items():
        fields = cls.__dataclass_fields__
        for key, default in DEFAULTS[family].items():
            if key in ("rope_theta", "rope_local_base_freq"):
                theta = cls.default_theta
                if isinstance(theta, dict):  # Gemma 3: global and local bases
                    theta = theta["global" if key == "rope_theta" else "local"]
                assert default == theta, (family, key)
                continue
            assert fields[key].default == default, (family, key)
            accepts_none = "None" in str(fields[key].type)
            assert accepts_none == (key in NULLABLE[family]), (family, key)


def test_mistral_without_sliding_window_is_a_4096_window_as_if_explicit():
    """transformers' MistralConfig reads no sliding_window as 4096, and so does nnxtrain."""
    assert MistralConfig(**FULL).sliding_window == 4096
    for extra in ({}, {"sliding_window": 4096}):
        hf_cfg = {**FULL, **extra, "model_type": "mistral"}
        assert to_model_config(hf_cfg, "m", param_dtype="float32").sliding_window == 4096
