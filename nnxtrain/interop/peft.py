"""LoRA adapters in PEFT's format, out and in, and merged into the base.

PEFT (`peft.PeftModel`) stores a LoRA adapter of a `LlamaForCausalLM` as two files:
`adapter_config.json` (r, lora_alpha, use_rslora, target_modules, ...) and
`adapter_model.safetensors`, whose keys are

    base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight    [r, in_features]
    base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight    [out_features, r]

(torch's `Linear` layout: `[out, in]`). nnxtrain's A is `[*in, r]` and B `[r, *out]`
(`nnxtrain.model.lora`, heads split out as the base weight has them), stacked over layers:
a tensor moves by a reshape and a transpose, the same as the base weight it adapts
(`nnxtrain.interop.hf.weights`), so no q/o projection's square shape can hide a transpose.

- `save_adapter(model, out, base)`: the two files, from a model with adapters (and its
  trained embeddings as PEFT's `modules_to_save`);
- `merged(model)`: the model without adapters, each targeted weight W + scale * A B
  computed in float32 (the untargeted ones are the base's arrays, untouched);
- `read_config(dir)` and `load_adapter(config, params, console)`: a PEFT adapter into a
  run (`model.lora.adapter`; its embed_tokens and lm_head among `modules_to_save` as
  `train_embeddings`), refusing in one line an option nnxtrain cannot represent.
"""

import dataclasses
import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from rich.console import Console
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from nnxtrain.config import LORA_TARGETS, Config, LoraConfig, ModelConfig, lora_targets
from nnxtrain.errors import ConfigError, UserError, first_line
from nnxtrain.model import Transformer, lora_scale

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
KEY = "model.lora.adapter"
# HF projection name -> (its module in a Llama layer, nnxtrain's adapter path in a layer)
MODULES = {
    "q_proj": ("self_attn", ("attn", "q_lora")),
    "k_proj": ("self_attn", ("attn", "k_lora")),
    "v_proj": ("self_attn", ("attn", "v_lora")),
    "o_proj": ("self_attn", ("attn", "o_lora")),
    "gate_proj": ("mlp", ("mlp", "gate_lora")),
    "up_proj": ("mlp", ("mlp", "up_lora")),
    "down_proj": ("mlp", ("mlp", "down_lora")),
}
# The base weight each adapter adds to (nnxtrain's path in a layer).
BASE = {
    "q_proj": ("attn", "wq"),
    "k_proj": ("attn", "wk"),
    "v_proj": ("attn", "wv"),
    "o_proj": ("attn", "wo"),
    "gate_proj": ("mlp", "w_gate"),
    "up_proj": ("mlp", "w_up"),
    "down_proj": ("mlp", "w_down"),
}
# PEFT's keys of the modules a run with model.lora.train_embeddings trains in full.
EMBED_KEYS = {
    "embed_tokens": "base_model.model.model.embed_tokens.weight",
    "lm_head": "base_model.model.lm_head.weight",
}
# adapter_config.json options nnxtrain cannot represent, and the value it supports.
UNSUPPORTED: dict[str, Any] = {
    "use_dora": False,
    "bias": "none",
    "fan_in_fan_out": False,
    "lora_bias": False,
    "use_qalora": False,
    "rank_pattern": {},
    "alpha_pattern": {},
    "layers_to_transform": None,
    "layer_replication": None,
    "trainable_token_indices": None,
    "target_parameters": None,
    "exclude_modules": None,
}


def hf_key(target: str, i: int, which: str) -> str:
    """PEFT's key of layer i's `lora_A` / `lora_B` weight of projection `target`."""
    module = MODULES[target][0]
    return f"base_model.model.model.layers.{i}.{module}.{target}.lora_{which}.weight"


def _adapter_arrays(model: Transformer) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Projection name -> (A [L, *in, r], B [L, r, *out]) as float32 host arrays."""
    flat = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))}
    out = {}
    for target in lora_targets(model.cfg.lora):
        path = ("layers", *MODULES[target][1])
        a, b = flat[(*path, "a")], flat[(*path, "b")]
        out[target] = (np.asarray(a, np.float32), np.asarray(b, np.float32))
    return out


def adapter_config(cfg: ModelConfig, base: str) -> dict[str, Any]:
    """adapter_config.json of a model's adapters (PEFT's LoraConfig keys)."""
    lora = cfg.lora
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base or None,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "use_rslora": lora.use_rslora,
        "lora_dropout": lora.dropout,
        "target_modules": list(lora_targets(lora)),
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": list(EMBED_KEYS) if lora.train_embeddings else None,
        "ensure_weight_tying": bool(lora.train_embeddings and cfg.tie_embeddings),
        "use_dora": False,
    }


def _embedding_tensors(model: Transformer) -> dict[str, np.ndarray]:
    """The trained embeddings (model.lora.train_embeddings) as PEFT saves the modules of
    `modules_to_save=["embed_tokens", "lm_head"]`: whole weights in torch's layout
    `[vocab, hidden]`, under the wrapped module's own name. A tied head is saved as the
    embedding again (PEFT does so with `ensure_weight_tying`, which ties them back)."""
    embed = np.asarray(model.embed.get_value(), np.float32)
    head = embed if model.cfg.tie_embeddings else np.asarray(model.lm_head.get_value()).T
    return {
        EMBED_KEYS["embed_tokens"]: np.ascontiguousarray(embed),
        EMBED_KEYS["lm_head"]: np.ascontiguousarray(head, np.float32),
    }


def save_adapter(model: Transformer, out_dir: str, base: str) -> list[str]:
    """Writes the model's adapters (and with model.lora.train_embeddings its trained
    embeddings) as a PEFT adapter directory; returns the files."""
    tensors = _embedding_tensors(model) if model.cfg.lora.train_embeddings else {}
    for target, (a, b) in _adapter_arrays(model).items():
        for i in range(a.shape[0]):
            r = a.shape[-1]
            tensors[hf_key(target, i, "A")] = np.ascontiguousarray(a[i].reshape(-1, r).T)
            tensors[hf_key(target, i, "B")] = np.ascontiguousarray(b[i].reshape(r, -1).T)
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(out_dir, CONFIG), "w") as f:
        json.dump(adapter_config(model.cfg, base), f, indent=2)
        f.write("\n")
    return [CONFIG, WEIGHTS]


def merged(model: Transformer) -> Transformer:
    """The model without adapters: each targeted weight W + scale * A B, summed in float32
    (and kept float32); every other parameter is the model's own array."""
    cfg = model.cfg
    base = nnx.to_pure_dict(nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))))
    scale = np.float32(lora_scale(cfg.lora))
    for target, (a, b) in _adapter_arrays(model).items():
        layer = base["layers"]
        for part in BASE[target][:-1]:
            layer = layer[part]
        w = np.asarray(layer[BASE[target][-1]], np.float32)
        n, r = a.shape[0], a.shape[-1]
        delta = np.matmul(a.reshape(n, -1, r), b.reshape(n, r, -1)) * scale
        layer[BASE[target][-1]] = jnp.asarray(w + delta.reshape(w.shape))
    plain = dataclasses.replace(cfg, lora=LoraConfig())
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(plain, rngs=nnx.Rngs(0))))
    nnx.replace_by_pure_dict(state, base)
    return nnx.merge(graphdef, state)


def read_config(path: str) -> LoraConfig:
    """The LoraConfig of PEFT adapter dir `path` (rank, alpha, rsLoRA, dropout, targets);
    a one-line ConfigError naming model.lora.adapter for anything nnxtrain cannot load."""
    file = os.path.join(path, CONFIG)
    if not os.path.isfile(file) or not os.path.isfile(os.path.join(path, WEIGHTS)):
        raise ConfigError(
            KEY,
            f"{path} holds no {CONFIG} and {WEIGHTS}",
            "give a PEFT LoRA adapter directory (as PeftModel.save_pretrained writes it)",
        )
    try:
        with open(file, encoding="utf-8") as f:
            raw = json.load(f)
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError, RecursionError) as e:
        raise ConfigError(KEY, f"{file} is unreadable ({first_line(e)})", "give PEFT's file") from e
    fix = "nnxtrain loads plain LoRA adapters of q/k/v/o/gate/up/down_proj only"
    if raw.get("peft_type", "LORA") != "LORA":
        raise ConfigError(KEY, f"{file}: peft_type {raw.get('peft_type')!r} is not LORA", fix)
    for option, supported in UNSUPPORTED.items():
        value = raw.get(option)
        if value not in (None, [], {}) and value != supported:
            shown = json.dumps(value)[:60]
            raise ConfigError(
                KEY,
                f"{file}: {option}={shown} is not supported (only {json.dumps(supported)})",
                fix,
            )
    saved = raw.get("modules_to_save") or []
    # PEFT may name a module by its full path (model.embed_tokens): the last part counts
    embeddings = (
        sorted({str(m).rsplit(".", 1)[-1] for m in saved}) if isinstance(saved, list) else []
    )
    if saved and embeddings != sorted(EMBED_KEYS):
        shown = json.dumps(saved)[:60]
        raise ConfigError(
            KEY,
            f"{file}: modules_to_save={shown} is not supported",
            "nnxtrain trains in full beside the adapters embed_tokens and lm_head together, "
            "or nothing",
        )
    targets = raw.get("target_modules")
    names = [targets] if isinstance(targets, str) else targets
    # PEFT saves all-linear resolved to full module names (model.layers.0.self_attn.q_proj):
    # the projection is the last part; a layer left out is found as its missing tensors.
    if isinstance(names, list) and all(isinstance(n, str) for n in names):
        names = sorted({n.rsplit(".", 1)[-1] for n in names})
    if not isinstance(names, list) or not all(n in (*LORA_TARGETS, "all-linear") for n in names):
        raise ConfigError(
            KEY, f"{file}: target_modules {json.dumps(targets)[:60]} unsupported", fix
        )
    r, alpha = raw.get("r"), raw.get("lora_alpha")
    if not (isinstance(r, int) and r > 0 and isinstance(alpha, int | float) and alpha > 0):
        raise ConfigError(KEY, f"{file}: r={r!r}, lora_alpha={alpha!r} are not positive", fix)
    return LoraConfig(
        rank=r,
        alpha=float(alpha),
        use_rslora=bool(raw.get("use_rslora", False)),
        dropout=float(raw.get("lora_dropout", 0.0) or 0.0),
        targets=list(names),
        train_embeddings=bool(saved),
        adapter=path,
    )


def load_adapter(config: Config, params: Any, console: Console) -> Any:
    """A copy of `params` with `model.lora.adapter`'s A and B in place of the fresh ones,
    each in the shards and dtype of the array it replaces."""
    t0, path, cfg = time.perf_counter(), config.model.lora.adapter, config.model
    try:
        tensors = load_file(os.path.join(path, WEIGHTS))
    except (OSError, SafetensorError) as e:
        raise ConfigError(
            KEY, f"{path}/{WEIGHTS} is unreadable ({first_line(e)})", "give PEFT's file"
        ) from e
    fresh = jax.tree.map(lambda x: x, params)
    flat = dict(nnx.to_flat_state(fresh))
    expected = set()
    for target in lora_targets(cfg.lora):
        path_a = ("layers", *MODULES[target][1], "a")
        path_b = ("layers", *MODULES[target][1], "b")
        var_a, var_b = flat[path_a], flat[path_b]
        shape_a, shape_b = var_a.get_value().shape, var_b.get_value().shape
        layers_a, layers_b = [], []
        for i in range(cfg.num_layers):
            ka, kb = hf_key(target, i, "A"), hf_key(target, i, "B")
            expected |= {ka, kb}
            a, b = _tensor(tensors, ka, path), _tensor(tensors, kb, path)
            r = shape_a[-1]
            want_a, want_b = (r, math.prod(shape_a[1:-1])), (math.prod(shape_b[2:]), r)
            for key, t, want in ((ka, a, want_a), (kb, b, want_b)):
                if t.shape != want:
                    raise UserError(
                        f"{KEY}: {path}/{WEIGHTS} does not fit this base: {key} is "
                        f"{list(t.shape)}, the model needs {list(want)}. Fix: give the adapter "
                        "trained on run.init_from's model"
                    )
            layers_a.append(a.T.reshape(shape_a[1:]))
            layers_b.append(b.T.reshape(shape_b[1:]))
        for var, stack in ((var_a, layers_a), (var_b, layers_b)):
            old = var.get_value()
            var.set_value(jax.device_put(np.stack(stack).astype(old.dtype), old.sharding))
    if cfg.lora.train_embeddings:  # modules_to_save: the embeddings, trained in full
        expected |= set(EMBED_KEYS.values())
        # both [vocab, hidden]; nnxtrain's lm_head is [hidden, vocab], a tied one is embed
        names = ["embed_tokens"] if cfg.tie_embeddings else ["embed_tokens", "lm_head"]
        for name in names:
            key, var = EMBED_KEYS[name], flat[("embed",) if name == "embed_tokens" else (name,)]
            t, old = _tensor(tensors, key, path), var.get_value()
            want = old.shape if name == "embed_tokens" else old.shape[::-1]
            if t.shape != want:
                raise UserError(
                    f"{KEY}: {path}/{WEIGHTS} does not fit this base: {key} is {list(t.shape)}"
                    f", the model needs {list(want)}. Fix: give the adapter trained on "
                    "run.init_from's model"
                )
            t = t if name == "embed_tokens" else t.T
            var.set_value(jax.device_put(t.astype(old.dtype), old.sharding))
    extra = sorted(set(tensors) - expected)
    if extra:
        raise UserError(
            f"{KEY}: {path}/{WEIGHTS} holds {extra[0]}, which this model has no place for "
            f"({len(extra)} such tensors). Fix: give the adapter trained on run.init_from's model"
        )
    console.print(
        f"lora: took the adapters of {path} in {time.perf_counter() - t0:.2f} s",
        markup=False,
        highlight=False,
    )
    return fresh


def _tensor(tensors: dict[str, np.ndarray], key: str, path: str) -> np.ndarray:
    if key not in tensors:
        raise UserError(
            f"{KEY}: {path}/{WEIGHTS} has no {key}. Fix: give the adapter trained on "
            "run.init_from's model, with the target_modules its adapter_config.json names"
        )
    return np.asarray(tensors[key], np.float32)


def attach_adapter(model: Transformer, path: str, console: Console) -> Transformer:
    """`model` (a base, e.g. `nnxtrain.hf.load`'s) with the PEFT adapter of dir `path`
    (for `nnxtrain-generate --adapter`): the base's arrays, the adapter's A and B."""
    lora = read_config(path)
    cfg = dataclasses.replace(model.cfg, lora=lora)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    base = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    nnx.replace_by_pure_dict(state, base)
    for _, var in nnx.to_flat_state(nnx.state(state, nnx.LoRAParam)):  # filled in just below
        shape = var.get_value()
        var.set_value(jnp.zeros(shape.shape, shape.dtype))
    params = load_adapter(Config(model=cfg), state, console)
    return nnx.merge(graphdef, params)
