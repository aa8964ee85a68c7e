"""The config's checks that need no device and no file, each naming its key and the fix.

Device checks live in `nnxtrain.parallel.mesh`, and checks of a file's contents where
`nnxtrain.data` reads it.
"""

import dataclasses
import math

from nnxtrain.config.dpo import validate_dpo, validate_grpo
from nnxtrain.config.lora import validate_lora
from nnxtrain.config.moe import validate_moe, validate_moe_mesh
from nnxtrain.config.schema import (
    ATTENTION_IMPLS,
    DATA_KINDS,
    DTYPES,
    FIT_MODES,
    GROUPS,
    REMAT_POLICIES,
    ROPE_SCALINGS,
    TOKEN_DTYPES,
    TRUNCATE_MODES,
    Config,
    DataConfig,
    ModelConfig,
    RunConfig,
)
from nnxtrain.errors import ConfigError


def _positive(key: str, value: int) -> None:
    if value <= 0:
        raise ConfigError(key, f"must be positive, got {value}", f"set {key} to a value >= 1")


def _finite(group: str, section: object) -> None:
    """Every float key of a group is finite (`optim.lr=nan` would train on NaN)."""
    for f in dataclasses.fields(section):  # type: ignore[arg-type]
        value = getattr(section, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(
                f"{group}.{f.name}", f"must be a finite number, got {value}", "give a number"
            )


def _in_ranges(ranges: list[tuple[str, float, bool, str]], defaults: dict[str, object]) -> None:
    for key, value, ok, allowed in ranges:
        if not ok:
            default = defaults[key.split(".")[0]]
            raise ConfigError(
                key,
                f"must be {allowed}, got {value}",
                f"use e.g. {getattr(default, key.split('.')[1])}",
            )


def _check_floats(cfg: Config) -> None:
    """Every float key is finite, and those with a valid range are inside it: out of range
    they fail much later, or never (a negative clip_norm silently turns clipping off)."""
    for group in GROUPS:
        _finite(group, getattr(cfg, group))
    o, r = cfg.optim, cfg.run
    ranges: list[tuple[str, float, bool, str]] = [
        ("run.goodput_every", r.goodput_every, r.goodput_every >= 0, ">= 0 (0: every step)"),
        ("optim.lr", o.lr, o.lr > 0, "> 0"),
        ("optim.b1", o.b1, 0 <= o.b1 < 1, "in [0, 1)"),
        ("optim.b2", o.b2, 0 <= o.b2 < 1, "in [0, 1)"),
        ("optim.eps", o.eps, o.eps > 0, "> 0"),
        ("optim.weight_decay", o.weight_decay, o.weight_decay >= 0, ">= 0"),
        ("optim.clip_norm", o.clip_norm, o.clip_norm >= 0, ">= 0 (0 turns clipping off)"),
        ("optim.min_lr_ratio", o.min_lr_ratio, o.min_lr_ratio >= 0, ">= 0"),
        ("optim.z_loss", o.z_loss, o.z_loss >= 0, ">= 0"),
        ("run.loss_chunk", r.loss_chunk, r.loss_chunk >= 0, ">= 0 (0: all positions at once)"),
    ]
    _in_ranges(ranges, {"optim": type(o)(), "run": type(r)()})


def validate_model(m: ModelConfig) -> ModelConfig:
    """The model group's checks; returns `m` unchanged when valid. `validate` runs them on
    every config, and `nnxtrain.hf.load` on the config.json it reads (naming its keys)."""
    for key, value in [
        ("model.vocab_size", m.vocab_size),
        ("model.emb_dim", m.emb_dim),
        ("model.num_layers", m.num_layers),
        ("model.num_heads", m.num_heads),
        ("model.num_kv_heads", m.num_kv_heads),
        ("model.head_dim", m.head_dim),
        ("model.mlp_dim", m.mlp_dim),
        ("model.max_len", m.max_len),
        ("model.rope_original_max_len", m.rope_original_max_len),
    ]:
        _positive(key, value)
    if m.num_heads % m.num_kv_heads:
        raise ConfigError(
            "model.num_kv_heads",
            f"must divide the number of query heads ({m.num_heads}), got {m.num_kv_heads}",
            "choose num_kv_heads that divides num_heads",
        )
    if m.sliding_window < 0:
        raise ConfigError(
            "model.sliding_window",
            f"must be 0 (no window) or a number of positions, got {m.sliding_window}",
            "use 0 or a positive window",
        )
    offs: list[tuple[str, float]] = [
        ("model.global_every", m.global_every),
        ("model.attn_scale", m.attn_scale),
        ("model.attn_softcap", m.attn_softcap),
        ("model.final_softcap", m.final_softcap),
        ("model.rope_local_theta", m.rope_local_theta),
    ]
    for key, amount in offs:
        if amount < 0:
            raise ConfigError(key, f"must be 0 (off) or positive, got {amount}", "use 0 or more")
    if m.head_dim % 2:
        raise ConfigError(
            "model.head_dim",
            f"must be even for rotary embeddings, got {m.head_dim}",
            "use an even head_dim",
        )
    choices: list[tuple[str, str, tuple[str, ...]]] = [
        ("model.param_dtype", m.param_dtype, DTYPES),
        ("model.dtype", m.dtype, ("auto", *DTYPES)),
        ("model.remat", m.remat, REMAT_POLICIES),
        ("model.rope_scaling", m.rope_scaling, ROPE_SCALINGS),
        ("model.attention", m.attention, ATTENTION_IMPLS),
        ("model.activation", m.activation, ("silu", "gelu_tanh")),
    ]
    for key, choice, allowed in choices:
        if choice not in allowed:
            raise ConfigError(key, f"unknown value {choice!r}", f"use one of {', '.join(allowed)}")
    _finite("model", m)
    ranges: list[tuple[str, float, bool, str]] = [
        ("model.init_std", m.init_std, m.init_std > 0, "> 0"),
        ("model.rope_theta", m.rope_theta, m.rope_theta > 0, "> 0"),
        ("model.norm_eps", m.norm_eps, m.norm_eps > 0, "> 0"),
        ("model.rope_factor", m.rope_factor, m.rope_factor > 0, "> 0"),
        ("model.rope_low_freq_factor", m.rope_low_freq_factor, m.rope_low_freq_factor > 0, "> 0"),
        (
            "model.rope_high_freq_factor",
            m.rope_high_freq_factor,
            m.rope_high_freq_factor > m.rope_low_freq_factor,
            f"> the low-frequency factor ({m.rope_low_freq_factor})",
        ),
    ]
    _in_ranges(ranges, {"model": ModelConfig()})
    validate_lora(m.lora)
    return validate_moe(m)


def fit_remats(cfg: Config) -> list[str]:
    """The remat policies run.fit searches: run.fit_remat's list, every policy for "all",
    model.remat for ""."""
    value = cfg.run.fit_remat
    if value == "all":
        return list(REMAT_POLICIES)
    if value == "" or value is None:
        return [cfg.model.remat]
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]


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
    ]:
        _positive(key, value)
    validate_model(m)
    for key, seed in (("run.seed", r.seed), ("data.source_seed", cfg.data.source_seed)):
        if not 0 <= seed < 2**63:  # numpy's generators take no negative seed, JAX's key no wider
            raise ConfigError(key, f"must be in [0, 2**63), got {seed}", f"set {key} to e.g. 0")
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
    if r.batch_size > 0 and r.batch_size % r.grad_accum:
        raise ConfigError(
            "run.grad_accum",
            f"run.batch_size={r.batch_size} is not divisible by run.grad_accum={r.grad_accum}",
            "pick a grad_accum that divides the batch size",
        )
    choices: list[tuple[str, str, tuple[str, ...]]] = [
        ("run.fit", r.fit, FIT_MODES),
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
    validate_moe_mesh(cfg)
    for axis in ("data", "fsdp", "tensor", "expert"):
        size = getattr(mc, axis)
        if size == 0 or size < -1:
            raise ConfigError(
                f"mesh.{axis}",
                f"must be positive or -1, got {size}",
                "use -1 to take all remaining devices",
            )
    if mc.num_processes == 0 or mc.num_processes < -1:
        raise ConfigError(
            "mesh.num_processes",
            f"must be >= 1, or -1 to detect the cluster, got {mc.num_processes}",
            "give the number of processes",
        )
    if mc.coordinator and mc.num_processes < 1:
        raise ConfigError(
            "mesh.num_processes",
            "must be >= 1 with mesh.coordinator set",
            "give the number of processes",
        )
    host, _, port = mc.coordinator.rpartition(":")
    if mc.coordinator and not (host and port.isdigit() and 0 < int(port) < 65536):
        raise ConfigError(
            "mesh.coordinator",
            f"{mc.coordinator!r} is not HOST:PORT (a port in 1..65535)",
            "use e.g. mesh.coordinator=127.0.0.1:29500",
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
    for policy in fit_remats(cfg):
        if policy not in REMAT_POLICIES:
            raise ConfigError(
                "run.fit_remat",
                f"unknown remat policy {policy!r}",
                f"give a list of {', '.join(REMAT_POLICIES)}, or all",
            )
    if r.fit and not cfg.mesh.target:
        raise ConfigError(
            "run.fit",
            f"{r.fit} searches what fits a device's memory: it needs the hardware to compile for",
            "add mesh.target=... (e.g. tpu:v6e-8)",
        )
    if cfg.mesh.target and not (r.dry_run or r.fit):
        raise ConfigError(
            "mesh.target",
            f"{cfg.mesh.target} is compiled for, not attached: it cannot train",
            "add run.dry_run=true or run.fit=max_batch (or drop mesh.target to train here)",
        )
    if mc.heartbeat_timeout < 4:  # the roll call for a lost process gets a quarter of it
        raise ConfigError("mesh.heartbeat_timeout", "must be >= 4 seconds", "use e.g. 100")
    if r.eval_every < 0:
        raise ConfigError("run.eval_every", f"must be >= 0, got {r.eval_every}", "use 0 to disable")
    _check_floats(cfg)
    for key, steps in (
        ("optim.warmup_steps", o.warmup_steps),
        ("optim.decay_steps", o.decay_steps),
    ):
        if steps < 0:
            raise ConfigError(key, f"must be >= 0, got {steps}", f"set {key} to 0 or more")
    if not 0 <= o.warmup_fraction < 1:
        raise ConfigError(
            "optim.warmup_fraction",
            f"must be in [0, 1), got {o.warmup_fraction}",
            "use a fraction such as 0.03, or 0 to use optim.warmup_steps",
        )
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
    validate_dpo(cfg)
    validate_grpo(cfg)
    _validate_data(d, r)
    return cfg


def _validate_data(d: DataConfig, r: RunConfig) -> None:
    """Checks of the data group that need no file (files are checked when read)."""
    for key, value in [("data.path", d.path), ("data.val_path", d.val_path)]:
        entries = [value] if isinstance(value, str) else value
        if not isinstance(entries, list | tuple) or not all(isinstance(v, str) for v in entries):
            raise ConfigError(
                key,
                f"must be a path or a list of paths, got {value!r}",
                f"give a file, a glob or a list of them, e.g. {key}=corpus.txt",
            )
    mask = d.document_mask
    if not (isinstance(mask, bool) or mask == "auto"):
        raise ConfigError(
            "data.document_mask", f"unknown value {mask!r}", "use auto, true or false"
        )
    if d.name == "synthetic":
        if mask is True:
            raise ConfigError(
                "data.document_mask",
                "true needs documents, and data=synthetic is one endless stream",
                "set data.document_mask=auto (or false), or use data=text, tokens or jsonl",
            )
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
    if d.name in ("jsonl", "preference"):
        _validate_jsonl(d)
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


def _validate_jsonl(d: DataConfig) -> None:
    if d.tokenizer == "char":
        raise ConfigError(
            "data.tokenizer",
            "char builds its vocabulary from plain text, not from JSON records",
            "use byte, a tokenizer.json or a SentencePiece .model",
        )
    if d.truncate not in TRUNCATE_MODES:
        raise ConfigError(
            "data.truncate",
            f"unknown value {d.truncate!r}",
            f"use one of {', '.join(TRUNCATE_MODES)}",
        )
    names = {
        "data.text_field": d.text_field,
        "data.prompt_field": d.prompt_field,
        "data.completion_field": d.completion_field,
        "data.messages_field": d.messages_field,
    }
    for key, name in names.items():
        if not isinstance(name, str) or not name:
            raise ConfigError(key, "must be a field name", f"set {key}=NAME")
    if len(set(names.values())) < len(names):
        raise ConfigError(
            "data.text_field", "the four record field names must differ", "rename one"
        )
