"""config.json's keys as nnxtrain reads them: each key's JSON type, and its value when the
key is absent, family by family, as transformers' config classes (`LlamaConfig`, `MistralConfig`,
`Qwen2Config`, `Qwen3Config`) give it.

    keys = Keys(hf, where)               # hf: config.json parsed; where: the model directory
    keys.get("hidden_size", int)         # the value, the family's default, or one line

A value of the wrong JSON type is a one-line `UserError` naming the key, where transformers'
strict config classes refuse it too: an int key takes no float (not even 4096.0) and no
bool, a bool key no 0 or 1; a float key takes any finite number (an int too). `null` is a
value only for the keys whose transformers type allows None (`NULLABLE`), with
transformers' meaning; elsewhere it is an error. tests/interop/test_hf_defaults.py checks
`DEFAULTS` and `NULLABLE` against the installed transformers, key by key.
"""

import json
import math
from typing import Any

from nnxtrain.errors import UserError

# The value of each key nnxtrain reads when config.json lacks it (transformers 5's dataclass
# defaults). None: derived (num_key_value_heads = num_attention_heads, head_dim = hidden_size
# / num_attention_heads) or off (sliding_window).
_COMMON: dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "head_dim": None,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "rope_theta": 10000.0,  # transformers' RotaryEmbeddingConfigMixin.default_theta
}
DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {
        **_COMMON,
        "intermediate_size": 11008,
        "num_key_value_heads": None,
        "max_position_embeddings": 2048,
        "attention_bias": False,
        "mlp_bias": False,
    },
    "mistral": {
        **_COMMON,
        "intermediate_size": 14336,
        "num_key_value_heads": 8,
        "max_position_embeddings": 4096 * 32,
        "sliding_window": 4096,  # a window, which nnxtrain refuses (not implemented)
    },
    "qwen2": {  # Qwen2Config has no head_dim field: config.json's, else hidden / heads
        **{k: v for k, v in _COMMON.items() if k != "head_dim"},
        "vocab_size": 151936,
        "intermediate_size": 22016,
        "num_key_value_heads": 32,
        "max_position_embeddings": 32768,
        "use_sliding_window": False,
        "sliding_window": 4096,  # only with use_sliding_window
    },
    "qwen3": {
        **_COMMON,
        "vocab_size": 151936,
        "head_dim": 128,  # explicit, not hidden / heads
        "intermediate_size": 22016,
        "num_key_value_heads": 32,
        "max_position_embeddings": 32768,
        "attention_bias": False,
        "use_sliding_window": False,
        "sliding_window": 4096,  # only with use_sliding_window
    },
    "gemma3_text": {
        **{k: v for k, v in _COMMON.items() if k != "hidden_act"},
        "vocab_size": 262208,
        "hidden_size": 2304,
        "intermediate_size": 9216,
        "num_hidden_layers": 26,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 256,
        "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": 131072,
        "tie_word_embeddings": True,
        "rope_theta": 1000000.0,  # the global layers'; the local ones: rope_local_base_freq
        "rope_local_base_freq": 10000.0,
        "attention_bias": False,
        "query_pre_attn_scalar": 256,
        "sliding_window": 4096,
        "final_logit_softcapping": None,
        "attn_logit_softcapping": None,
    },
    "gemma2": {
        **{k: v for k, v in _COMMON.items() if k != "hidden_act"},
        "vocab_size": 256000,
        "hidden_size": 2304,
        "intermediate_size": 9216,
        "num_hidden_layers": 26,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 256,
        "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": 8192,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "query_pre_attn_scalar": 256,
        "sliding_window": 4096,
        "final_logit_softcapping": 30.0,
        "attn_logit_softcapping": 50.0,
    },
    "mixtral": {
        **_COMMON,
        "intermediate_size": 14336,  # each expert's
        "num_key_value_heads": 8,
        "max_position_embeddings": 4096 * 32,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1000000.0,  # MixtralConfig.default_theta
        "sliding_window": None,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "router_aux_loss_coef": 0.001,
        "router_jitter_noise": 0.0,
    },
    "qwen3_moe": {  # no head_dim field: config.json's, else hidden / heads
        **{k: v for k, v in _COMMON.items() if k != "head_dim"},
        "vocab_size": 151936,
        "hidden_size": 2048,
        "intermediate_size": 6144,  # the dense layers' (mlp_only_layers), not the experts'
        "num_hidden_layers": 24,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "max_position_embeddings": 32768,
        "attention_bias": False,
        "use_sliding_window": False,
        "sliding_window": 4096,  # only with use_sliding_window
        "decoder_sparse_step": 1,
        "moe_intermediate_size": 768,
        "num_experts_per_tok": 8,
        "num_experts": 128,  # also read as num_local_experts (transformers 5 writes that)
        "norm_topk_prob": False,
        "router_aux_loss_coef": 0.001,
        "mlp_only_layers": None,
    },
}
# Keys whose explicit null transformers accepts (and means what an absent None means).
NULLABLE: dict[str, frozenset[str]] = {
    "llama": frozenset({"num_key_value_heads", "head_dim"}),
    "mistral": frozenset({"head_dim", "sliding_window"}),
    "qwen2": frozenset({"num_key_value_heads", "sliding_window"}),
    "qwen3": frozenset({"num_key_value_heads", "sliding_window"}),
    "gemma3_text": frozenset(
        {"sliding_window", "final_logit_softcapping", "attn_logit_softcapping"}
    ),
    "gemma2": frozenset({"sliding_window", "final_logit_softcapping", "attn_logit_softcapping"}),
    "mixtral": frozenset({"head_dim", "sliding_window"}),
    "qwen3_moe": frozenset({"sliding_window", "mlp_only_layers"}),
}
_WORDS = {
    int: "an integer",
    bool: "true or false",
    str: "a string",
    dict: "an object",
    list: "a list",
}


def bad(where: str, key: str, problem: str, fix: str) -> UserError:
    """The one-line error about config.json key `key` of directory `where`."""
    return UserError(f"{where}: config.json key {key!r} {problem}. Fix: {fix}.")


def shown(value: Any, limit: int = 60) -> str:
    """`value` as JSON text cut to `limit` characters: a hostile value stays one line."""
    try:
        text = json.dumps(value)  # ASCII: escapes newlines and lone surrogates
    except (TypeError, ValueError, RecursionError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def typed(value: Any, kind: type, key: str, where: str) -> Any:
    """`value` (of config.json key `key`) if it has JSON type `kind`; else one line."""
    if kind is float:
        number = isinstance(value, int | float) and not isinstance(value, bool)
        try:
            value = float(value) if number else value
        except OverflowError:  # an int beyond float's range
            number = False
        if number and math.isfinite(value):
            return value
        raise bad(where, key, f"is {shown(value)}, not a finite number", f"give {key} a number")
    if type(value) is kind:  # exactly: True is an int to isinstance, not to transformers
        return value
    raise bad(where, key, f"is {shown(value)}, not {_WORDS[kind]}", f"give {key} {_WORDS[kind]}")


class Keys:
    """Typed reads of one config.json, with its family's defaults for absent keys."""

    def __init__(self, hf: dict[str, Any], where: str, family: str):
        self.hf, self.where, self.family = hf, where, family

    def get(self, key: str, kind: type, default: Any = None) -> Any:
        """Key `key` as `kind`; absent: the family's default (`default` for a key the family
        does not define); null: None where transformers allows it, else an error."""
        if key not in self.hf:
            return DEFAULTS[self.family].get(key, default)
        value = self.hf[key]
        if value is None and (key in NULLABLE[self.family] or key not in DEFAULTS[self.family]):
            return None
        return typed(value, kind, key, self.where)
