"""`run.init_from=PATH`: training starts from pretrained weights, those of a Hugging Face
directory or of an nnxtrain run's checkpoint; the step and the optimizer start fresh.

    nnxtrain run.init_from=hf/TinyLlama data=text data.path=corpus.txt +experiment=finetune
    nnxtrain run.init_from=runs/a run.dir=runs/b   # the parameters of a's latest checkpoint

A LoRA run's checkpoint holds adapters only: as `run.init_from` it gives the model that run
trained, its base with the adapters merged in (what `nnxtrain-export --merge` writes), to a
full fine-tune or to new adapters alike.

Two moments, one owner:
- as the config is composed, `resolve(config, overrides)` takes the model's shape from PATH
  (an HF directory's config.json checked against its safetensors headers, so absurd sizes
  fail here, before anything is built), and the tokenizer (PATH's tokenizer.json or
  tokenizer.model, or the run's data.tokenizer) unless data.tokenizer is set; an HF
  directory with no tokenizer file is an error for data=text and data=jsonl, which would
  encode bytes the model never saw. A `model.*` shape key given in `overrides` (the command
  line's) that differs from PATH's is an error naming it; the keys of how the model runs
  (USER_KEYS) stay the user's. It reads files only and touches no JAX device, so it runs
  before JAX starts. `compose(overrides)` is `nnxtrain.config.compose` followed by it (the
  public `nnxtrain.compose`).
- after the state is initialised, `load_params(config, params, mesh, console)` reads the
  weights straight into the run's shards, in model.param_dtype. The Trainer calls it only
  when nothing was restored: a rerun of an interrupted fine-tune resumes the fine-tune.

`source(PATH)` tells what PATH holds: a Hugging Face directory (config.json and
safetensors), or an nnxtrain run dir, its checkpoints/ dir or one `<step>` dir
(`nnxtrain.checkpoint.reader`).
"""

import dataclasses
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh
from rich.console import Console

from nnxtrain.checkpoint import reader as checkpoint_reader
from nnxtrain.checkpoint.model import read_model
from nnxtrain.config import Config, LoraConfig, ModelConfig, MoeConfig, validate
from nnxtrain.config import compose as compose_config
from nnxtrain.errors import ConfigError, UserError
from nnxtrain.interop.hf import load as load_hf
from nnxtrain.interop.hf import open_model
from nnxtrain.interop.peft import merged
from nnxtrain.interop.peft import read_config as read_peft_config
from nnxtrain.parallel.sharding import merge_rules

KEY = "run.init_from"
# How the model runs, not what it is: always the user's (LoRA adapts PATH's weights).
USER_KEYS = ("scan_layers", "remat", "param_dtype", "dtype", "attention", "lora")
# Not the weights' shape: PATH's unless given on the command line.
SOFT_KEYS = ("name", "max_len", "init_std")
HF_TOKENIZERS = ("tokenizer.json", "tokenizer.model")
TOKENIZING = ("text", "tokens", "jsonl")  # the data kinds that read a tokenizer
ENCODING = ("text", "jsonl")  # those that cannot do without one (tokens: ids already made)


@dataclass(frozen=True)
class Source:
    """What `run.init_from` points at."""

    path: str
    kind: str  # "hf" (a Hugging Face directory) or "run" (an nnxtrain checkpoint)
    model: ModelConfig  # its shape (param_dtype as stored, or float32)
    tokenizer: str | None  # the tokenizer file it was trained with, when known
    checkpoint: checkpoint_reader.Checkpoint | None = None  # kind "run"


def _looks_like_run(path: str) -> bool:
    names = os.listdir(path)
    return (
        any(n in names for n in ("checkpoints", "config.yaml", "run_info.json"))
        or any(n.isdigit() for n in names)
        or checkpoint_reader.is_step_dir(path)
    )


def source(path: str) -> Source:
    """The model at `path`; a one-line error naming run.init_from if there is none."""
    what = (
        "give a Hugging Face model directory (config.json and safetensors) or an nnxtrain run dir"
    )
    if not os.path.exists(path):
        raise ConfigError(KEY, f"{path} does not exist", what)
    if not os.path.isdir(path):
        raise ConfigError(KEY, f"{path} is a file, not a directory", what)
    try:
        if os.path.isfile(os.path.join(path, "config.json")):
            model, _ = open_model(path)  # every check short of reading a tensor: quick
            found = (os.path.join(path, n) for n in HF_TOKENIZERS)
            tokenizer = next((os.path.abspath(f) for f in found if os.path.isfile(f)), None)
            return Source(path, "hf", model, tokenizer)
        if not _looks_like_run(path):
            raise ConfigError(
                KEY,
                f"{path} holds neither config.json (a Hugging Face model) nor checkpoints "
                "(an nnxtrain run)",
                what,
            )
        ckpt = checkpoint_reader.locate(path)
        model = _model_config(ckpt.config["model"])
    except ConfigError:
        raise
    except UserError as e:
        raise UserError(f"{KEY}: {e}") from e
    return Source(path, "run", model, _run_tokenizer(ckpt), ckpt)


def _model_config(saved: dict[str, Any]) -> ModelConfig:
    """The ModelConfig a checkpoint recorded (keys this version lacks are left out)."""
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    kwargs = {k: v for k, v in saved.items() if k in known}
    for name, section in (("lora", LoraConfig), ("moe", MoeConfig)):
        if isinstance(kwargs.get(name), dict):  # a nested section comes back as a dict
            known = set(section.__dataclass_fields__)
            kwargs[name] = section(**{k: v for k, v in kwargs[name].items() if k in known})
    return ModelConfig(**kwargs)


def _run_tokenizer(ckpt: checkpoint_reader.Checkpoint) -> str | None:
    """The tokenizer file of the run a checkpoint came from (None: byte or unknown)."""
    spec = str(ckpt.config.get("data", {}).get("tokenizer", ""))
    run_dir = os.path.dirname(ckpt.directory)
    if spec == "char":  # the vocabulary the run built, kept in its run dir
        spec = os.path.join(run_dir, "char_vocab.json")
    if spec in ("", "byte"):
        return None
    candidates = [spec, os.path.join(run_dir, spec)]
    return next((os.path.abspath(p) for p in candidates if os.path.isfile(p)), None)


def _overridden(overrides: Sequence[str]) -> set[str]:
    """The model keys set by command-line overrides (`model.emb_dim=64` -> emb_dim)."""
    keys = (o.split("=", 1)[0].lstrip("+~") for o in overrides if "=" in o)
    return {k.split(".")[1] for k in keys if k.startswith("model.") and k.count(".") == 1}


def resolve(config: Config, overrides: Sequence[str] | None = None) -> Config:
    """`config` with the model's shape and tokenizer of `run.init_from` (unchanged without
    one). `overrides` are the command line's: a model shape key among them that differs
    from PATH's is an error. Without them (a Config built in Python) the config's own
    name, max_len and init_std stay."""
    if config.model.lora.adapter:  # a PEFT adapter: its rank, alpha, targets
        if not config.run.init_from:
            raise ConfigError(
                "model.lora.adapter",
                "needs the base model the adapter was trained on",
                "set run.init_from to that base (a Hugging Face model dir)",
            )
        lora = read_peft_config(config.model.lora.adapter)
        lora = dataclasses.replace(lora, base_dtype=config.model.lora.base_dtype)
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, lora=lora))
    if not config.run.init_from:
        return config
    src = source(config.run.init_from)
    given = _overridden(overrides) if overrides is not None else set(SOFT_KEYS)
    changes = {}
    for f in dataclasses.fields(ModelConfig):
        key, ours, theirs = f.name, getattr(config.model, f.name), getattr(src.model, f.name)
        if key in USER_KEYS or ours == theirs:
            continue
        if key in given and key not in SOFT_KEYS:
            raise ConfigError(
                f"model.{key}",
                f"{ours} conflicts with {KEY}={src.path}, whose model has {theirs}",
                f"drop model.{key} (the model's shape comes from {KEY})",
            )
        if key not in given:
            changes[key] = theirs
    data = config.data
    # every kind that tokenizes (jsonl too: it once fell back to byte, ids the model never saw)
    if data.name in TOKENIZING and not data.tokenizer:
        if src.tokenizer:
            data = dataclasses.replace(data, tokenizer=src.tokenizer)
        elif src.kind == "hf" and data.name in ENCODING:  # bytes: ids the model never saw
            raise ConfigError(
                "data.tokenizer",
                f"{KEY}={src.path} holds no {' or '.join(HF_TOKENIZERS)}, and data={data.name} "
                "needs the model's tokenizer (nnxtrain-generate refuses this directory too)",
                "set data.tokenizer to the model's tokenizer.json or tokenizer.model, or copy "
                f"it into {src.path}",
            )
    # The weights fix the vocabulary: a tokenizer with more tokens is an error, not a resize.
    data = dataclasses.replace(data, vocab_size_from_tokenizer=False)
    model = dataclasses.replace(config.model, **changes)
    return validate(dataclasses.replace(config, model=model, data=data))


def compose(overrides: list[str] | None = None, config_name: str = "config") -> Config:
    """Composes the shipped configs with overrides, as the CLI would, without running; with
    run.init_from, the model's shape and tokenizer come from PATH (`resolve`)."""
    config = compose_config(overrides, config_name)
    return resolve(config, list(overrides or []))


def load_params(config: Config, params: Any, mesh: Mesh | None, console: Console) -> Any:
    """A copy of the model's `params` (an nnx.State) holding the weights of `run.init_from`,
    each array in the shards (and the dtype) of the one it replaces."""
    t0, src = time.perf_counter(), source(config.run.init_from)
    # With LoRA the weights fill the base; the adapters stay as initialised.
    base = nnx.split_state(params, nnx.LoRAParam, ...)[1] if config.model.lora.rank else params
    if src.kind == "hf":
        rules = merge_rules(config.mesh.rules)
        lora = config.model.lora
        dtype = lora.base_dtype if lora.rank and lora.base_dtype else config.model.param_dtype
        model = load_hf(src.path, param_dtype=dtype, mesh=mesh, rules=rules)
        loaded = nnx.to_pure_dict(nnx.state(model))
        if lora.rank and lora.train_embeddings:  # trained in full: in param_dtype
            pdt = config.model.param_dtype
            for name in ("embed", "lm_head"):
                if name in loaded:
                    loaded[name] = loaded[name].astype(pdt)
        where = src.path
    elif src.checkpoint is not None and src.checkpoint.lora_base is not None:
        loaded = jax.tree.map(
            lambda a, b: a.astype(b.dtype), _merged_lora_run(src.checkpoint), nnx.to_pure_dict(base)
        )
        where = f"the merged LoRA model of step {src.checkpoint.step} ({src.checkpoint.path})"
    else:
        assert src.checkpoint is not None
        target = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
            nnx.to_pure_dict(base),
        )
        loaded = checkpoint_reader.read_params(src.checkpoint, target)
        where = f"step {src.checkpoint.step} ({src.checkpoint.path})"
    fresh = jax.tree.map(lambda x: x, params)  # a new State; `params` stays as it was
    shardings = jax.tree.map(lambda a: a.sharding, nnx.to_pure_dict(base))
    nnx.replace_by_pure_dict(fresh, jax.device_put(loaded, shardings))
    console.print(
        f"init_from: took the parameters of {where} in {time.perf_counter() - t0:.2f} s "
        "(step 0, a fresh optimizer)",
        markup=False,
        highlight=False,
    )
    return fresh


def _merged_lora_run(ckpt: checkpoint_reader.Checkpoint) -> dict[str, Any]:
    """The weights a LoRA run's checkpoint computes with: its base (built again as that run
    built it, its digest checked) with the adapters merged in, W + scale * A B in float32,
    as `nnxtrain-export --merge` writes them. Full fine-tune or new adapters start from the
    model the LoRA run trained; continuing its own adapters is `--adapter`'s export read
    back with model.lora.adapter (docs/lora.md)."""

    def quiet_base(config: Config, params: Any) -> Any:
        return load_params(config, params, None, Console(quiet=True))

    _, _, model = read_model(ckpt.path, load_base=quiet_base)
    return nnx.to_pure_dict(nnx.state(merged(model)))
