"""The Hugging Face model families nnxtrain reads and writes, registered by config.json's
`model_type`: each is Llama plus deltas (the `ModelConfig` switches it turns on).

    family = FAMILIES["qwen3"]            # reading: config.json's model_type picks it
    family = family_of(cfg)               # writing: the model's switches pick it

A family names its transformers class (`architectures` on export), the switches its
checkpoints always have, the config.json keys that would mean a bias the decoder does not
run, and, for Qwen, the key that turns `sliding_window` on at all. Its config.json keys
and their defaults are `keys.DEFAULTS[model_type]`; its extra tensors are the `Weight`
rows of `weights` whose `needs` is one of its switches. docs/models.md says how to add one.
"""

from dataclasses import dataclass, field

from nnxtrain.config import ModelConfig
from nnxtrain.errors import UserError

# The switches that make a Gemma; its numeric ones (norm_offset, embed_scale, activation,
# attn_scale, the soft-caps, the window) are read from config.json by the adapter.
GEMMA = ("qk_norm", "sandwich_norms")


@dataclass(frozen=True)
class Family:
    """What one `model_type` adds to Llama."""

    model_type: str
    architecture: str  # transformers' class, written to config.json's `architectures`
    # The ModelConfig switches its models have (on import: qkv_bias, qk_norm set as given;
    # sliding_window comes from config.json); on export, those that make a model this family.
    switches: dict[str, bool] = field(default_factory=dict)
    bias_keys: tuple[str, ...] = ()  # config.json keys that, true, mean an unsupported bias
    window_gate: str = ""  # config.json key without which sliding_window is off (Qwen)


FAMILIES = {
    f.model_type: f
    for f in (
        Family("llama", "LlamaForCausalLM", bias_keys=("attention_bias", "mlp_bias")),
        Family(
            "mistral",
            "MistralForCausalLM",
            {"sliding_window": True},
            bias_keys=("attention_bias", "mlp_bias"),
        ),
        # Qwen2's q/k/v biases are fixed in its code; it reads no attention_bias key.
        Family("qwen2", "Qwen2ForCausalLM", {"qkv_bias": True}, (), "use_sliding_window"),
        # Qwen3's attention_bias would bias o as well, which the decoder has not got.
        Family(
            "qwen3",
            "Qwen3ForCausalLM",
            {"qk_norm": True},
            ("attention_bias",),
            "use_sliding_window",
        ),
        # Gemma 3 (text): these switches; its window, layer pattern, rotary bases, scale
        # and soft-caps come from config.json (`config._gemma`)
        Family("gemma3_text", "Gemma3ForCausalLM", dict.fromkeys(GEMMA, True), ("attention_bias",)),
        # Gemma 2: Gemma 3 less the q/k norms, with its attention soft-cap applied
        Family("gemma2", "Gemma2ForCausalLM", {"sandwich_norms": True}, ("attention_bias",)),
        # Mixtures of experts (model.moe, `moe`): Mistral's window, or Qwen3's q/k norms
        Family("mixtral", "MixtralForCausalLM"),
        Family(
            "qwen3_moe",
            "Qwen3MoeForCausalLM",
            {"qk_norm": True},
            ("attention_bias",),
            "use_sliding_window",
        ),
    )
}
# Export: the first family whose switches are exactly the model's (Llama has none).
_EXPORTS = ("gemma3_text", "gemma2", "qwen3", "qwen2", "mistral", "llama")
_MOE_EXPORTS = ("qwen3_moe", "mixtral")
SWITCHES = ("qkv_bias", "qk_norm", "sliding_window", "sandwich_norms")


def family_of(cfg: ModelConfig) -> Family:
    """The family a model with this config is written as; one line if none fits."""
    on = {s for s in SWITCHES if getattr(cfg, s)}
    moe = bool(cfg.moe.experts)
    if cfg.sandwich_norms or (moe and not cfg.qk_norm):  # Gemma's, Mixtral's own window
        on.discard("sliding_window")
    for name in _MOE_EXPORTS if moe else _EXPORTS:
        if set(FAMILIES[name].switches) == on:
            return FAMILIES[name]
    both = " and ".join(f"model.{s}" for s in SWITCHES if s in on)
    raise UserError(
        f"{both} are set together, which no Hugging Face family nnxtrain writes has. Fix: keep "
        "one (qkv_bias: Qwen2, qk_norm: Qwen3, sliding_window: Mistral; Gemma 3: qk_norm and "
        "sandwich_norms) to export this model."
    )
