"""Typed run configuration: one frozen dataclass per Hydra config group, and their checks.

The dataclasses below are the single source of truth for every key a run accepts. Hydra
needs mutable schemas to compose (it merges YAML files and overrides into them), so
`register_schemas()` derives a mutable twin of each class and stores it in Hydra's
ConfigStore; a typo anywhere then fails at compose time naming the key. After composition
`from_omegaconf()` turns the composed tree back into the frozen classes the code uses.

Use from Python (a notebook, a test)::

    from nnxtrain.config import compose
    cfg = compose(["model=small", "run.steps=50"])

`validate()` holds the checks that need no device and no file; device checks live in
`nnxtrain.mesh`, and checks of a file's contents where `nnxtrain.data` reads it.
"""

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf

from nnxtrain.errors import ConfigError

T = TypeVar("T")

DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "matmul")
DATA_KINDS = ("synthetic", "text", "tokens")
TOKEN_DTYPES = ("uint16", "uint32")  # of raw .bin token files


def setting(default: Any, help: str) -> Any:
    """A config key: its default and one-line help with unit (docs/config.md's meaning)."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class ModelConfig:
    """The Llama-style decoder's shape and numerics."""

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
    norm_eps: float = setting(1e-5, "RMSNorm epsilon")
    tie_embeddings: bool = setting(False, "reuse the token embedding as the output projection")
    # Unrolled is faster on CPU for the small models a CPU trains; scanned compiles once.
    scan_layers: bool | None = setting(
        None, "scan stacked layers; null = auto: unrolled on CPU only"
    )
    remat: str = setting("none", "rematerialisation: none, full, dots or dots_no_batch")
    param_dtype: str = setting("float32", "dtype parameters are stored and updated in")
    dtype: str = setting("auto", "activation dtype; auto = bfloat16 on GPU/TPU, float32 on CPU")
    attention: str = setting(
        "auto", "kernel: xla, cudnn, matmul; auto = matmul on CPU, else JAX's choice"
    )
    init_std: float = setting(0.02, "stddev of the normal initialiser for weight matrices")


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh: the size of each axis; -1 takes all remaining devices."""

    data: int = setting(1, "data-parallel replicas (batch split, weights replicated)")
    fsdp: int = setting(-1, "fully sharded data parallel (batch and weights split)")
    tensor: int = setting(1, "tensor parallel (heads and MLP features split)")
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


@dataclass(frozen=True)
class RunConfig:
    """The run itself: length, batch, seed and where results go."""

    steps: int = setting(300, "optimizer steps to train")
    batch_size: int = setting(16, "global batch, in sequences; -1 = one sequence per device")
    seq_len: int = setting(128, "tokens per sequence")
    seed: int = setting(0, "seed for parameters and data")
    dir: str = setting("", "run directory; the CLI uses Hydra's output dir, Python ./runs/<time>")
    log_every: int = setting(10, "steps between metric lines")
    dry_run: bool = setting(False, "build abstractly, compile the step, print accounting, exit")
    grad_accum: int = setting(1, "micro-batches per step, accumulated inside the compiled step")
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


@dataclass(frozen=True)
class DataConfig:
    """Where batches come from."""

    name: str = setting("synthetic", "dataset kind: synthetic, text or tokens")
    branching: int = setting(4, "synthetic: likely successors of each token in the Markov source")
    source_seed: int = setting(1234, "synthetic: seed of the Markov source (fixed across runs)")
    path: Any = setting("", "text/tokens: a file, a glob, or a list of them (.txt / .npy, .bin)")
    val_path: Any = setting("", "held-out files like path; empty = the last val_fraction of path")
    val_fraction: float = setting(0.1, "share of path's tokens held out from its end (no val_path)")
    tokenizer: str = setting(
        "", 'byte, char, a tokenizer.json or a SentencePiece .model; text: ""=byte'
    )
    vocab_size_from_tokenizer: bool = setting(
        True, "model.vocab_size := the tokenizer's; false: keep"
    )
    eos_token: str = setting(
        "", 'end-of-document token of a tokenizer file; "" = its own (or a new id)'
    )
    doc_separator: str = setting("", 'text: string between documents in a file; "" = a file is one')
    token_dtype: str = setting(
        "auto", "tokens .bin: uint16 or uint32; auto = meta.json's, else uint16"
    )
    shuffle: bool = setting(True, "shuffle training sequences each epoch, seeded by run.seed")
    prefetch: int = setting(2, "training batches prepared ahead on a background thread; 0 = none")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup, cosine decay and global-norm clipping; the loss weights."""

    name: str = setting("adamw", "optimizer: adamw")
    lr: float = setting(3e-3, "peak learning rate")
    warmup_steps: int = setting(20, "linear warmup from 0 to lr, in steps")
    decay_steps: int = setting(0, "cosine decay length after warmup, in steps; 0 = until run.steps")
    min_lr_ratio: float = setting(0.1, "final learning rate as a fraction of lr")
    b1: float = setting(0.9, "Adam first-moment decay")
    b2: float = setting(0.95, "Adam second-moment decay")
    eps: float = setting(1e-8, "Adam epsilon")
    weight_decay: float = setting(0.1, "decoupled weight decay (matrices only)")
    clip_norm: float = setting(1.0, "global gradient-norm clip; 0 disables")
    z_loss: float = setting(0.0, "weight of the z-loss term (mean squared log-partition)")


@dataclass(frozen=True)
class Config:
    """A whole run: one field per config group, plus the callbacks keyed by name."""

    model: ModelConfig = field(default_factory=ModelConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    # name -> {"_target_": "pkg.Class" or a registered short name, **kwargs}; fired in order
    callbacks: dict[str, Any] = field(default_factory=dict)


GROUPS: dict[str, type] = {
    "model": ModelConfig,
    "mesh": MeshConfig,
    "run": RunConfig,
    "data": DataConfig,
    "optim": OptimConfig,
}


def _mutable_twin(cls: type, cache: dict[type, type]) -> type:
    """A non-frozen copy of a frozen config dataclass, for Hydra's ConfigStore."""
    if cls in cache:
        return cache[cls]
    hints = typing.get_type_hints(cls)
    fields = []
    for f in dataclasses.fields(cls):
        ftype = hints[f.name]
        if dataclasses.is_dataclass(ftype):
            twin = _mutable_twin(typing.cast(type, ftype), cache)
            fields.append((f.name, twin, field(default_factory=twin)))
        elif f.default_factory is not dataclasses.MISSING:
            fields.append((f.name, ftype, field(default_factory=f.default_factory)))
        else:
            fields.append((f.name, ftype, field(default=f.default)))
    twin = dataclasses.make_dataclass(cls.__name__ + "Schema", fields)
    cache[cls] = twin
    return twin


def register_schemas() -> None:
    """Stores the schemas in Hydra's ConfigStore (`nnxtrain_schema`, `<group>/schema`)."""
    from hydra.core.config_store import ConfigStore

    cache: dict[type, type] = {}
    store = ConfigStore.instance()
    store.store(name="nnxtrain_schema", node=_mutable_twin(Config, cache))
    for group, cls in GROUPS.items():
        store.store(group=group, name="schema", node=_mutable_twin(cls, cache))


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Builds a frozen config dataclass from plain data, naming any unknown key in full
    (`run.stepz`, not `stepz`); `prefix` is the dotted path of `data` in the whole config."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(typing.cast(Any, cls))}
    for key in data:
        if key not in names:
            raise ConfigError(
                prefix + key, f"unknown key for {cls.__name__}", f"use one of {sorted(names)}"
            )
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        ftype = hints[key]
        if dataclasses.is_dataclass(ftype) and isinstance(value, dict):
            kwargs[key] = from_dict(typing.cast(type, ftype), value, f"{prefix}{key}.")
        else:
            kwargs[key] = value
    return cls(**kwargs)


def from_omegaconf(cfg: DictConfig) -> Config:
    """Resolves a composed Hydra config into the frozen `Config` (hydra keys dropped)."""
    data = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    assert isinstance(data, dict)
    data = {k: v for k, v in data.items() if k in GROUPS or k == "callbacks"}
    return validate(from_dict(Config, typing.cast(dict[str, Any], data)))


def compose(overrides: list[str] | None = None, config_name: str = "config") -> Config:
    """Composes the shipped configs with overrides, as the CLI would, without running."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    register_schemas()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="nnxtrain.conf", version_base="1.3"):
        cfg = hydra_compose(config_name=config_name, overrides=list(overrides or []))
    return from_omegaconf(cfg)


def _positive(key: str, value: int) -> None:
    if value <= 0:
        raise ConfigError(key, f"must be positive, got {value}", f"set {key} to a value >= 1")


def validate(cfg: Config) -> Config:
    """Checks that span keys or need more than a type; returns cfg unchanged when valid."""
    m, r, o = cfg.model, cfg.run, cfg.optim
    for key, value in [
        ("run.steps", r.steps),
        ("run.seq_len", r.seq_len),
        ("run.log_every", r.log_every),
        ("run.grad_accum", r.grad_accum),
        ("run.eval_batches", r.eval_batches),
        ("run.preempt_check_every", r.preempt_check_every),
        ("model.vocab_size", m.vocab_size),
        ("model.emb_dim", m.emb_dim),
        ("model.num_layers", m.num_layers),
        ("model.num_heads", m.num_heads),
        ("model.num_kv_heads", m.num_kv_heads),
        ("model.head_dim", m.head_dim),
        ("model.mlp_dim", m.mlp_dim),
        ("model.max_len", m.max_len),
    ]:
        _positive(key, value)
    if r.batch_size == 0 or r.batch_size < -1:
        raise ConfigError(
            "run.batch_size",
            f"must be positive (or -1 for one sequence per device), got {r.batch_size}",
            "set run.batch_size to a value >= 1",
        )
    if r.seq_len > m.max_len:
        raise ConfigError(
            "run.seq_len",
            f"{r.seq_len} exceeds model.max_len={m.max_len} of model '{m.name}'",
            f"set run.seq_len<={m.max_len} or raise model.max_len",
        )
    if m.num_heads % m.num_kv_heads:
        raise ConfigError(
            "model.num_kv_heads",
            f"model.num_heads={m.num_heads} is not divisible by num_kv_heads={m.num_kv_heads}",
            "choose num_kv_heads that divides num_heads",
        )
    if m.head_dim % 2:
        raise ConfigError(
            "model.head_dim",
            f"must be even for rotary embeddings, got {m.head_dim}",
            "use an even head_dim",
        )
    if r.batch_size > 0 and r.batch_size % r.grad_accum:
        raise ConfigError(
            "run.grad_accum",
            f"run.batch_size={r.batch_size} is not divisible by run.grad_accum={r.grad_accum}",
            "pick a grad_accum that divides the batch size",
        )
    choices: list[tuple[str, str, tuple[str, ...]]] = [
        ("model.param_dtype", m.param_dtype, DTYPES),
        ("model.dtype", m.dtype, ("auto", *DTYPES)),
        ("model.remat", m.remat, REMAT_POLICIES),
        ("model.attention", m.attention, ATTENTION_IMPLS),
        ("optim.name", o.name, ("adamw",)),
        ("data.name", cfg.data.name, DATA_KINDS),
    ]
    for key, choice, allowed in choices:
        if choice not in allowed:
            raise ConfigError(key, f"unknown value {choice!r}", f"use one of {', '.join(allowed)}")
    if r.host_devices < -1:
        raise ConfigError(
            "run.host_devices",
            f"must be >= -1, got {r.host_devices}",
            "use -1 for one device per core, 0 for JAX's default",
        )
    mc = cfg.mesh
    if mc.coordinator and mc.num_processes < 1:
        raise ConfigError(
            "mesh.num_processes",
            "must be >= 1 with mesh.coordinator set",
            "give the number of processes",
        )
    if mc.num_processes > 1 and not mc.coordinator:
        raise ConfigError(
            "mesh.coordinator",
            f"mesh.num_processes={mc.num_processes} needs a coordinator",
            "set mesh.coordinator=HOST:PORT of process 0",
        )
    if not 0 <= mc.process_id < max(mc.num_processes, 1) and mc.num_processes != -1:
        raise ConfigError(
            "mesh.process_id",
            f"{mc.process_id} is outside 0..{mc.num_processes - 1}",
            "give each process a distinct id below mesh.num_processes",
        )
    if mc.init_timeout < 1:
        raise ConfigError("mesh.init_timeout", "must be >= 1 second", "use e.g. 300")
    if mc.heartbeat_timeout < 4:  # the roll call for a lost process gets a quarter of it
        raise ConfigError("mesh.heartbeat_timeout", "must be >= 4 seconds", "use e.g. 100")
    if r.eval_every < 0:
        raise ConfigError("run.eval_every", f"must be >= 0, got {r.eval_every}", "use 0 to disable")
    if o.lr <= 0:
        raise ConfigError("optim.lr", f"must be positive, got {o.lr}", "set optim.lr > 0")
    if o.warmup_steps < 0 or o.decay_steps < 0:
        raise ConfigError("optim.warmup_steps", "warmup/decay steps must be >= 0", "use 0 or more")
    if not 0 <= o.min_lr_ratio <= 1:
        raise ConfigError(
            "optim.min_lr_ratio",
            f"must be in [0, 1], got {o.min_lr_ratio}",
            "use a fraction such as 0.1",
        )
    if o.z_loss < 0:
        raise ConfigError("optim.z_loss", f"must be >= 0, got {o.z_loss}", "use 0 to disable")
    d = cfg.data
    if d.name == "synthetic" and (d.branching < 1 or d.branching > m.vocab_size):
        raise ConfigError(
            "data.branching",
            f"must be in [1, model.vocab_size], got {d.branching}",
            "use a small number such as 4",
        )
    _validate_data(d, r)
    return cfg


def _validate_data(d: DataConfig, r: RunConfig) -> None:
    """Checks of the data group that need no file (files are checked when read)."""
    for key, value in [("data.path", d.path), ("data.val_path", d.val_path)]:
        entries = [value] if isinstance(value, str) else value
        if not isinstance(entries, list | tuple) or not all(isinstance(v, str) for v in entries):
            raise ConfigError(key, f"must be a path or a list of paths, got {value!r}", "fix it")
    if d.name == "synthetic":
        return
    if not d.path:
        raise ConfigError(
            "data.path", f"data={d.name} needs files", "set data.path=FILE (a glob or a list)"
        )
    if d.name == "tokens" and d.tokenizer == "char":
        raise ConfigError(
            "data.tokenizer",
            "char builds its vocabulary from text, and data=tokens has none",
            "give the char_vocab.json the corpus was made with, or leave it empty",
        )
    if not 0 <= d.val_fraction < 1:
        raise ConfigError(
            "data.val_fraction", f"must be in [0, 1), got {d.val_fraction}", "use e.g. 0.1"
        )
    if r.eval_every and not d.val_path and d.val_fraction == 0:
        raise ConfigError(
            "data.val_fraction",
            f"0 with no data.val_path leaves nothing to evaluate every {r.eval_every} steps",
            "set data.val_fraction>0, give data.val_path, or set run.eval_every=0",
        )
    if d.token_dtype not in ("auto", *TOKEN_DTYPES):
        raise ConfigError(
            "data.token_dtype", f"unknown dtype {d.token_dtype!r}", "use auto, uint16 or uint32"
        )
    if d.prefetch < 0:
        raise ConfigError("data.prefetch", f"must be >= 0, got {d.prefetch}", "use 0 to disable")
