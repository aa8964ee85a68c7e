"""The run's keys: one frozen dataclass per Hydra config group, each field with its help.

These classes are the single source of truth for every key a run accepts; `setting(default,
help)` gives each field its one-line help with unit (docs/config.md is written from it).
"""

from dataclasses import dataclass, field
from typing import Any

DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
FIT_MODES = ("", "max_batch")
ROPE_SCALINGS = ("none", "linear", "llama3")  # Hugging Face's rope_type names
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "matmul", "splash")
DATA_KINDS = ("synthetic", "text", "tokens", "jsonl", "preference")
DPO_LOSSES = ("sigmoid", "ipo")  # dpo.loss_type: TRL's names
TRUNCATE_MODES = ("right", "drop", "error")  # of jsonl records longer than a row
TOKEN_DTYPES = ("uint16", "uint32")  # of raw .bin token files
DOCUMENT_MASKS = ("auto", True, False)  # data.document_mask
# model.lora.targets: the projections by their Hugging Face names (PEFT's target_modules)
MOE_IMPLS = ("auto", "ragged", "blocks")  # model.moe.impl
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def setting(default: Any, help: str) -> Any:
    """A config key: its default and one-line help with unit (docs/config.md's meaning)."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters on the decoder's projections (docs/lora.md); rank 0 = off."""

    rank: int = setting(0, "rank r of every adapter; 0 = no LoRA (full fine-tune)")
    alpha: float = setting(
        16.0, "adapter scale numerator: delta = alpha/r * B A (PEFT's lora_alpha)"
    )
    use_rslora: bool = setting(False, "rank-stabilised scale alpha/sqrt(r) instead of alpha/r")
    dropout: float = setting(0.0, "dropout on an adapter's input during training, in [0, 1)")
    # Any, not list: it also takes "all-linear" (OmegaConf structured configs have no unions).
    targets: Any = setting(
        "all-linear",
        "projections adapted, by HF name (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, "
        "down_proj), a list of them, or all-linear",
    )
    train_embeddings: bool = setting(
        False, "also train the token embedding and lm_head in full (their optimizer state too)"
    )
    base_dtype: str = setting(
        "", 'dtype the frozen base is held in (e.g. bfloat16); "" = model.param_dtype'
    )
    adapter: str = setting(
        "", "start from this PEFT adapter dir (adapter_config.json; run.init_from = its base)"
    )

    def __post_init__(self) -> None:
        # A model's config is static data of its graph, hashed by jit: a tuple, not a list.
        if isinstance(self.targets, list):
            object.__setattr__(self, "targets", tuple(self.targets))


@dataclass(frozen=True)
class MoeConfig:
    """A mixture of experts in place of every layer's MLP (docs/moe.md); experts 0 = dense."""

    experts: int = setting(0, "routed SwiGLU experts per layer; 0 = a dense MLP (no MoE)")
    top_k: int = setting(2, "experts each token is sent to (HF: num_experts_per_tok)")
    mlp_dim: int = setting(0, "hidden features of each expert; 0 = model.mlp_dim")
    norm_topk_prob: bool = setting(
        True, "renormalise the top-k routing weights to sum to 1 (Mixtral: always; Qwen3-MoE: key)"
    )
    aux_loss_coef: float = setting(
        0.001, "weight of the load-balancing loss in the training loss (HF: router_aux_loss_coef)"
    )
    z_loss_coef: float = setting(
        0.0, "weight of the router z-loss (mean squared log-sum-exp of router logits); 0 = off"
    )
    capacity_factor: float = setting(
        0.0,
        "0 = dropless (grouped matmuls); > 0: each expert takes at most "
        "ceil(factor * tokens * top_k / experts) tokens, the rest dropped and counted",
    )
    impl: str = setting(
        "auto",
        "dropless grouped matmul: ragged (jax.lax.ragged_dot), blocks (expert-sorted tiles, "
        "one batched matmul); auto = blocks on CPU, ragged elsewhere",
    )
    # Any, not list: a tuple once built (a model's config is hashed by jit), a list in YAML.
    mlp_only_layers: Any = setting(
        (), "layers (0-based) that keep a dense MLP of model.mlp_dim (HF: mlp_only_layers)"
    )
    decoder_sparse_step: int = setting(
        1,
        "layer i has experts when (i + 1) % step == 0 (and is not in mlp_only_layers), "
        "else a dense MLP (HF: decoder_sparse_step)",
    )

    def __post_init__(self) -> None:
        if isinstance(self.mlp_only_layers, list):
            object.__setattr__(self, "mlp_only_layers", tuple(self.mlp_only_layers))


@dataclass(frozen=True)
class ModelConfig:
    """The Llama-style decoder's shape and numerics, with the switches of the other families."""

    name: str = setting("small", "label printed in logs and run_info.json")
    vocab_size: int = setting(256, "tokens in the vocabulary")
    emb_dim: int = setting(128, "model width (residual stream), in features")
    num_layers: int = setting(4, "decoder layers")
    num_heads: int = setting(4, "query heads")
    num_kv_heads: int = setting(2, "key/value heads (grouped-query attention); divides num_heads")
    head_dim: int = setting(32, "features per attention head")
    mlp_dim: int = setting(384, "hidden features of the SwiGLU MLP")
    max_len: int = setting(512, "longest sequence the model accepts, in tokens")
    rope_theta: float = setting(10000.0, "rotary embedding base wavelength")
    # Context extension of the rotary frequencies, as Hugging Face computes them (rope_type);
    # the defaults below are Llama 3.1's, so `model.rope_scaling=llama3` alone gives its.
    rope_scaling: str = setting("none", "rotary frequency scaling: none, linear or llama3")
    rope_factor: float = setting(8.0, "linear/llama3: divides the (long-wavelength) frequencies")
    rope_low_freq_factor: float = setting(1.0, "llama3: wavelengths over orig_len/this are scaled")
    rope_high_freq_factor: float = setting(4.0, "llama3: wavelengths under orig_len/this are kept")
    rope_original_max_len: int = setting(
        8192, "llama3: context length the model was pretrained with, in tokens"
    )
    norm_eps: float = setting(1e-5, "RMSNorm epsilon")
    tie_embeddings: bool = setting(False, "reuse the token embedding as the output projection")
    # Family switches (docs/models.md): each defaults to Llama's behaviour.
    qkv_bias: bool = setting(False, "bias on the q, k and v projections (Qwen2/2.5)")
    qk_norm: bool = setting(False, "RMSNorm over head_dim on q and k before RoPE (Qwen3)")
    sliding_window: int = setting(
        0, "a query sees only this many latest keys, itself included (Mistral); 0 = all"
    )
    global_every: int = setting(
        0, "with sliding_window: every Nth layer attends to all keys (Gemma 3: 6); 0 = none"
    )
    rope_local_theta: float = setting(
        0.0, "rotary base of the sliding-window layers, unscaled (Gemma 3); 0 = rope_theta"
    )
    norm_offset: float = setting(0.0, "RMSNorm scales by (norm_offset + weight) (Gemma: 1)")
    embed_scale: bool = setting(False, "scale embeddings by sqrt(emb_dim) (Gemma)")
    activation: str = setting("silu", "gate activation: silu (SwiGLU) or gelu_tanh (GeGLU)")
    sandwich_norms: bool = setting(False, "norms after attention and after the MLP too (Gemma)")
    attn_scale: float = setting(0.0, "query scale; 0 = head_dim ** -0.5 (Gemma: its own)")
    attn_softcap: float = setting(0.0, "tanh soft-cap of attention scores (Gemma 2); 0 = off")
    final_softcap: float = setting(0.0, "tanh soft-cap of the logits (Gemma 2); 0 = off")
    # Unrolled is faster on CPU for the small models a CPU trains; scanned compiles once.
    scan_layers: bool | None = setting(
        None, "scan stacked layers; null = auto: unrolled when compiled for CPU only"
    )
    remat: str = setting("none", "rematerialisation: none, full, dots or dots_no_batch")
    param_dtype: str = setting(
        "float32", "dtype parameters are stored in; optimizer state stays float32 (performance.md)"
    )
    dtype: str = setting("auto", "activation dtype; auto = bfloat16 on GPU/TPU, float32 on CPU")
    attention: str = setting(
        "auto", "kernel: xla, cudnn, matmul, splash (TPU); auto = matmul on CPU, else JAX's choice"
    )
    init_std: float = setting(0.02, "stddev of the normal initialiser for weight matrices")
    lora: LoraConfig = field(
        default_factory=LoraConfig, metadata={"help": "LoRA adapters (model.lora.*)"}
    )
    moe: MoeConfig = field(
        default_factory=MoeConfig, metadata={"help": "mixture of experts (model.moe.*)"}
    )


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh: the size of each axis; -1 takes all remaining devices."""

    data: int = setting(1, "data-parallel replicas (batch split, weights replicated)")
    fsdp: int = setting(-1, "fully sharded data parallel (batch and weights split)")
    tensor: int = setting(1, "tensor parallel (heads and MLP features split)")
    expert: int = setting(
        1, "expert parallel: experts split, tokens sent to them all-to-all; the batch too"
    )
    rules: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "logical name -> mesh axes overrides"}
    )
    coordinator: str = setting("", "multi-process: HOST:PORT of process 0; empty = single process")
    num_processes: int = setting(
        1, "processes in the run; -1 = detect from the environment (SLURM, ...)"
    )
    process_id: int = setting(0, "this process's index, 0 .. num_processes - 1")
    init_timeout: int = setting(300, "seconds to wait for all processes to join")
    heartbeat_timeout: int = setting(
        100, "seconds of silence before a process counts as lost (run ends)"
    )
    target: str = setting(
        "", "compile for this hardware, not the local devices (dry runs): tpu:v6e-8, tpu:v5p:2x2x1"
    )


@dataclass(frozen=True)
class RunConfig:
    """The run itself: length, batch, seed and where results go."""

    steps: int = setting(300, "optimizer steps to train")
    batch_size: int = setting(16, "global batch, in sequences; -1 = one sequence per device")
    seq_len: int = setting(128, "tokens per sequence")
    seed: int = setting(0, "seed for parameters and data")
    dir: str = setting("", "run directory; the CLI uses Hydra's output dir, Python ./runs/<time>")
    log_every: int = setting(10, "steps between metric lines")
    goodput_every: float = setting(
        10.0, "seconds between keeping the goodput account in run_info.json (kills); 0 = every step"
    )
    dry_run: bool = setting(False, "build abstractly, compile the step, print accounting, exit")
    fit: str = setting(
        "", "max_batch: compile for mesh.target at growing batches, print the largest that fits"
    )
    # Any, not list: it also takes "all" (OmegaConf structured configs have no unions).
    fit_remat: Any = setting(
        "", 'run.fit: remat policies to search, a list (e.g. [none,full]) or all; "" = model.remat'
    )
    grad_accum: int = setting(1, "micro-batches per step, accumulated inside the compiled step")
    loss_chunk: int = setting(
        0, "positions whose logits the loss holds at once (recomputed backward); 0 = all"
    )
    eval_every: int = setting(100, "steps between evaluations on held-out batches; 0 = never")
    eval_batches: int = setting(4, "held-out batches per evaluation")
    host_devices: int = setting(
        -1, "CPU devices (set before JAX starts); -1 = auto, 0 = JAX's default"
    )
    fail_fast: bool = setting(False, "in a multirun, stop the sweep at the first failed job")
    compile_cache: str = setting(
        "auto", "compiled-step cache dir; auto = $XDG_CACHE_HOME/nnxtrain/jax"
    )
    preempt_check_every: int = setting(
        10, "steps between multi-process stop agreements (1 process: every)"
    )
    init_from: str = setting(
        "", "start from these weights: an HF dir or a run dir (step 0, fresh optimizer)"
    )


@dataclass(frozen=True)
class DataConfig:
    """Where batches come from."""

    name: str = setting(
        "synthetic", "dataset kind: synthetic, text, tokens, jsonl or preference (trains DPO)"
    )
    branching: int = setting(4, "synthetic: likely successors of each token in the Markov source")
    source_seed: int = setting(1234, "synthetic: seed of the Markov source (fixed across runs)")
    path: Any = setting(
        "", "text/tokens/jsonl: a file, a glob, or a list of them (.txt / .npy, .bin / .jsonl)"
    )
    val_path: Any = setting("", "held-out files like path; empty = the last val_fraction of path")
    val_fraction: float = setting(
        0.1, "share of path's tokens (jsonl: records) held out from its end (no val_path)"
    )
    tokenizer: str = setting(
        "",
        'byte, char, a tokenizer.json or a SentencePiece .model; ""=run.init_from\'s '
        "(an HF dir's is required for text, jsonl), else byte",
    )
    vocab_size_from_tokenizer: bool = setting(
        True, "model.vocab_size := the tokenizer's; false: keep"
    )
    eos_token: str = setting(
        "",
        'end-of-document token of a tokenizer file; "" = its own (or a new id); '
        "jsonl: tokenizer_config.json's first; tokens with no tokenizer or meta: its id",
    )
    doc_separator: str = setting("", 'text: string between documents in a file; "" = a file is one')
    token_dtype: str = setting(
        "auto", "tokens .bin: uint16 or uint32; auto = meta.json's, else uint16"
    )
    chat_template: str = setting(
        "",
        'jsonl messages: "" = the tokenizer\'s (else default), default, a .jinja file, or '
        "the name of one of the tokenizer's named templates",
    )
    truncate: str = setting(
        "right", "jsonl: a record over run.seq_len + 1 tokens: right (cut), drop or error"
    )
    skip_bad_records: bool = setting(
        False, "jsonl: skip bad records (counted, reported); false = stop at the first"
    )
    text_field: str = setting("text", "jsonl: field of plain-text records (all tokens count)")
    prompt_field: str = setting("prompt", "jsonl: field of the prompt (not in the loss)")
    completion_field: str = setting("completion", "jsonl: field of the completion (the loss)")
    messages_field: str = setting(
        "messages", "jsonl: field of a conversation (the loss: assistant turns)"
    )
    # Any, not bool: it also takes "auto" (OmegaConf structured configs have no unions).
    document_mask: Any = setting(
        "auto",
        "packed documents attend only within themselves, positions restart; auto = on for "
        "jsonl, text, tokens with a known EOS",
    )
    max_prompt_len: int = setting(
        0, "preference: a prompt keeps its last this many tokens (counted); 0 = no limit"
    )
    max_completion_len: int = setting(
        0, "preference: a reply keeps its first this many tokens (counted); 0 = no limit"
    )
    shuffle: bool = setting(True, "shuffle training sequences each epoch, seeded by run.seed")
    prefetch: int = setting(2, "training batches prepared ahead on a background thread; 0 = none")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup, cosine decay and global-norm clipping; the loss weights."""

    name: str = setting("adamw", "optimizer: adamw")
    lr: float = setting(3e-3, "peak learning rate")
    warmup_steps: int = setting(20, "linear warmup from 0 to lr, in steps")
    warmup_fraction: float = setting(
        0.0, "warmup as a fraction of run.steps (rounded up); > 0 replaces warmup_steps"
    )
    decay_steps: int = setting(0, "cosine decay length after warmup, in steps; 0 = until run.steps")
    min_lr_ratio: float = setting(0.1, "final learning rate as a fraction of lr")
    b1: float = setting(0.9, "Adam first-moment decay")
    b2: float = setting(0.95, "Adam second-moment decay")
    eps: float = setting(1e-8, "Adam epsilon")
    weight_decay: float = setting(0.1, "decoupled weight decay (matrices only)")
    clip_norm: float = setting(1.0, "global gradient-norm clip; 0 disables")
    z_loss: float = setting(0.0, "weight of the z-loss term (mean squared log-partition)")


@dataclass(frozen=True)
class DpoConfig:
    """Direct preference optimisation, trained when data=preference (docs/preference.md)."""

    beta: float = setting(0.1, "how far the policy may move from the reference (> 0)")
    loss_type: str = setting("sigmoid", "sigmoid (DPO) or ipo (length-normalised, squared)")
    label_smoothing: float = setting(
        0.0, "sigmoid: the share of pairs taken as mislabelled (conservative DPO), in [0, 0.5)"
    )
    reference: str = setting(
        "init", "the reference model: init (the starting weights), or an HF dir or run dir"
    )
    precompute_ref: bool = setting(
        False, "compute the reference log-probs in one pass before training, then free it"
    )


@dataclass(frozen=True)
class GrpoConfig:
    """GRPO: sample, reward, update (`nnxtrain.train.grpo`, docs/preference.md)."""

    generations: int = setting(8, "G: completions sampled per prompt (a group); >= 2")
    max_new_tokens: int = setting(16, "longest completion, in tokens")
    temperature: float = setting(1.0, "sampling temperature (> 0)")
    epsilon_low: float = setting(0.2, "the ratio is clipped below at 1 - this")
    epsilon_high: float = setting(0.2, "the ratio is clipped above at 1 + this")
    beta: float = setting(
        0.0, "weight of the k3 KL to the reference (the starting model); 0 = none"
    )
    iterations: int = setting(1, "updates per batch of samples (the old policy: the sampler's)")
    # name -> {"_target_": "module.function", "weight": float}; (prompt, completion, row) -> float
    rewards: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "reward functions by name: _target_ and weight"}
    )


@dataclass(frozen=True)
class Config:
    """A whole run: one field per config group, plus the callbacks keyed by name."""

    model: ModelConfig = field(default_factory=ModelConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    dpo: DpoConfig = field(default_factory=DpoConfig)
    grpo: GrpoConfig = field(default_factory=GrpoConfig)
    # name -> {"_target_": "pkg.Class" or a registered short name, **kwargs}; fired in order
    callbacks: dict[str, Any] = field(default_factory=dict)


GROUPS: dict[str, type] = {
    "model": ModelConfig,
    "mesh": MeshConfig,
    "run": RunConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "dpo": DpoConfig,
    "grpo": GrpoConfig,
}
