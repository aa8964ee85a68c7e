"""Parameter counts and FLOPs per step, following MaxText's accounting (made exact).

- Parameters: every leaf, embeddings and norms included.
- Learnable-weight FLOPs: 2 FLOPs per multiply-add for every matmul with a weight (q, k,
  v, o, the three SwiGLU matrices and the output projection, tied or not); the embedding
  lookup is a gather and counts nothing.
- Attention FLOPs: the score (QK^T) and value (PV) matmuls, 2 * 2 * B * L^2 * H * D per
  layer, halved because the causal mask makes half of the scores unused (the visible
  pairs with the diagonal counted half: exactly L^2 / 2). With a sliding window W < L a
  query sees at most W keys: the same count is L * W - W (W - 1) / 2 - L / 2, in each
  sliding layer (all of them, or all but every `global_every`-th: Gemma 3).
- A mixture of experts (`model.moe`): its layers hold the router [embed, experts] and
  every expert's three matrices, all counted in the parameters; a token runs through the
  router and its top_k experts only, so the FLOPs and the active parameters count those
  (MFU is of active FLOPs). Capacity mode's dropped pairs are counted as computed. Its
  dense layers (`model.moe.mlp_only_layers`, `decoder_sparse_step`) count the MLP.
- Training is forward plus backward, counted as 3x forward (backward = 2x forward). The
  remat recomputation is not counted: it is overhead, not model FLOPs (as in MFU).

    report = step_flops(cfg.model, batch_size=16, seq_len=128, num_devices=1)
    report.tflops_per_step_per_device, report.learnable_fraction
"""

from dataclasses import dataclass

from nnxtrain.config import ModelConfig, expert_mlp_dim, sparse_layers


def _mlp_params(cfg: ModelConfig, active: bool) -> int:
    """All layers' feed-forward weights: each layer's SwiGLU MLP, or its router and experts
    (those a token runs through when `active`); a mixture's dense layers have the MLP."""
    e = cfg.emb_dim
    sparse = sum(sparse_layers(cfg))
    dense = (cfg.num_layers - sparse) * 3 * e * cfg.mlp_dim
    experts = cfg.moe.top_k if active else cfg.moe.experts
    return dense + sparse * (e * cfg.moe.experts + experts * 3 * e * expert_mlp_dim(cfg))


def active_params(cfg: ModelConfig) -> int:
    """The parameters one token runs through: all but the experts it is not routed to."""
    return count_params(cfg) - (_mlp_params(cfg, False) - _mlp_params(cfg, True))


def count_params(cfg: ModelConfig) -> int:
    """Number of parameters of the decoder with this config, every leaf included."""
    e, h, kv, d, v = cfg.emb_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size
    per_layer = e * h * d + 2 * e * kv * d + h * d * e + 2 * e
    per_layer += (h + 2 * kv) * d if cfg.qkv_bias else 0  # Qwen2's q, k, v biases
    per_layer += 2 * d if cfg.qk_norm else 0  # Qwen3's and Gemma's q and k norms
    per_layer += 2 * e if cfg.sandwich_norms else 0  # Gemma's norms after attention and MLP
    head = 0 if cfg.tie_embeddings else e * v
    return v * e + cfg.num_layers * per_layer + _mlp_params(cfg, False) + e + head


def matmul_params(cfg: ModelConfig) -> int:
    """Weights that take part in a matmul per token (embedding lookup and norms excluded;
    of a mixture of experts, the router and the token's top_k experts)."""
    e, h, kv, d = cfg.emb_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    per_layer = e * h * d + 2 * e * kv * d + h * d * e
    return cfg.num_layers * per_layer + _mlp_params(cfg, True) + e * cfg.vocab_size


@dataclass(frozen=True)
class FlopsReport:
    """FLOPs of one training step (forward + backward), in total and per device."""

    num_params: int  # parameters of the model, every leaf
    learnable_flops: float  # weight matmul FLOPs of one step, whole batch
    attention_flops: float  # attention score/value FLOPs of one step, whole batch
    num_devices: int  # devices the step is spread over
    # batch_size * seq_len: the FLOPs count every place of every row, padding included
    # (the device computes it); tokens/s counts only non-padding (StepEndEvent.tokens)
    tokens_per_step: int
    active_params: int = 0  # per token (a mixture of experts: less than num_params); 0 = all

    @property
    def flops_per_step_per_device(self) -> float:
        return (self.learnable_flops + self.attention_flops) / self.num_devices

    @property
    def tflops_per_step_per_device(self) -> float:
        return self.flops_per_step_per_device / 1e12

    @property
    def learnable_tflops(self) -> float:
        """Learnable-weight TFLOPs per step per device."""
        return self.learnable_flops / self.num_devices / 1e12

    @property
    def attention_tflops(self) -> float:
        """Attention TFLOPs per step per device."""
        return self.attention_flops / self.num_devices / 1e12

    @property
    def learnable_fraction(self) -> float:
        return self.learnable_flops / (self.learnable_flops + self.attention_flops)

    def as_dict(self) -> dict[str, float]:
        return {
            "num_params": self.num_params,
            "tflops_per_step_per_device": self.tflops_per_step_per_device,
            "learnable_tflops": self.learnable_tflops,
            "attention_tflops": self.attention_tflops,
            "learnable_fraction": self.learnable_fraction,
            "tokens_per_step": self.tokens_per_step,
            "num_devices": self.num_devices,
            "active_params": self.active_params or self.num_params,
        }

    def summary(self) -> str:
        """The two lines every run prints."""
        active = self.active_params
        sparse = (
            f", active per token: {active / 1e9:.3f} billion ({active:,})"
            if active and active != self.num_params
            else ""
        )
        return (
            f"number of parameters: {self.num_params / 1e9:.3f} billion ({self.num_params:,})"
            f"{sparse}\n"
            f"per train step: total TFLOPs {self.tflops_per_step_per_device:.6g} per device, "
            f"split as {100 * self.learnable_fraction:.2f}% learnable weight flops and "
            f"{100 * (1 - self.learnable_fraction):.2f}% attention flops"
        )


def step_flops(
    cfg: ModelConfig, batch_size: int, seq_len: int, num_devices: int = 1
) -> FlopsReport:
    """FLOPs of one training step of `batch_size` sequences of `seq_len` tokens."""
    tokens = batch_size * seq_len
    learnable_fwd = 2 * tokens * matmul_params(cfg)
    # QK^T and PV: 2 matmuls x 2 FLOPs x B x L x L x H x D, halved by the causal mask.
    w = cfg.sliding_window
    # the visible (query, key) pairs, the diagonal counted half (so causal is L^2 / 2, as
    # MaxText halves); a window shorter than the sequence cuts each query's keys to w
    full = seq_len**2 / 2
    pairs = seq_len * w - w * (w - 1) / 2 - seq_len / 2 if 0 < w < seq_len else full
    # Gemma: every global_every-th layer attends to all keys, the others through the window
    n_global = cfg.num_layers // cfg.global_every if w and cfg.global_every else 0
    layer_pairs = (cfg.num_layers - n_global) * pairs + n_global * full
    attention_fwd = 4 * batch_size * layer_pairs * cfg.num_heads * cfg.head_dim
    return FlopsReport(
        num_params=count_params(cfg),
        learnable_flops=3.0 * learnable_fwd,
        attention_flops=3.0 * attention_fwd,
        num_devices=num_devices,
        tokens_per_step=tokens,
        active_params=active_params(cfg),
    )
