"""`nnxtrain-export`: writes a Hugging Face Llama directory from a run's checkpoint.

    nnxtrain-export runs/a hf/a                      # the latest checkpoint, as trained
    nnxtrain-export runs/a hf/a --step 200 --dtype bfloat16

Reads only the parameters of `<run>/checkpoints/<step>/state` (Orbax, as the checkpointer
plugin writes it), and the model's shape from that step's meta (the run's config.yaml if
the meta has none); the tokenizer file of `data.tokenizer` (a tokenizer.json or a
SentencePiece .model) is copied, and its end-of-text id written to config.json. The
checkpoint is opened read-only. Bad input is one line on stderr and exit code 2.
"""

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any, cast

import jax
import orbax.checkpoint as ocp
from flax import nnx
from omegaconf import OmegaConf

from nnxtrain.config import Config, ModelConfig, from_dict
from nnxtrain.errors import UserError, first_line
from nnxtrain.hf import save
from nnxtrain.model import Transformer

EXIT_BAD_INPUT = 2


def checkpoint_dir(run_dir: str) -> str:
    """The checkpoints directory of a run dir (or the directory itself if it is one)."""
    if not os.path.isdir(run_dir):
        raise UserError(f"{run_dir} is not a directory. Fix: give a run directory.")
    default = os.path.join(run_dir, "checkpoints")
    if os.path.isdir(default):
        return default
    config = _run_config(run_dir) or {}
    for cb in config.get("callbacks", {}).values():  # a checkpointer saving elsewhere
        target = str(cb.get("_target_", "")) if isinstance(cb, dict) else ""
        if target.rsplit(".", 1)[-1].lower() == "checkpointer" and cb.get("directory"):
            return os.path.join(run_dir, cb["directory"])
    return run_dir  # perhaps the checkpoints directory itself


def _run_config(run_dir: str) -> dict[str, Any] | None:
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        return None
    try:
        data = OmegaConf.to_container(OmegaConf.load(path))
    except Exception as e:
        raise UserError(f"{path} is unreadable ({first_line(e)}). Fix: repair it.") from e
    return cast(dict[str, Any], data) if isinstance(data, dict) else None


def _manager(directory: str) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(read_only=True, cleanup_tmp_directories=False)
    handlers = {"state": ocp.PyTreeCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


def read_checkpoint(run_dir: str, step: int | None = None) -> tuple[int, Config, Transformer]:
    """(step, the run's config, the model with the checkpoint's parameters) of the latest
    complete checkpoint of `run_dir`, or of `step`; on JAX's default device."""
    directory = checkpoint_dir(run_dir)
    mngr = _manager(directory)
    steps = sorted(mngr.all_steps())
    if not steps:
        raise UserError(
            f"{run_dir} has no complete checkpoint (looked in {directory}). "
            "Fix: give the run directory of a run that saved one."
        )
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise UserError(
            f"--step {step}: {directory} has no checkpoint of that step "
            f"(it has {', '.join(map(str, steps))}). Fix: pick one of those."
        )
    where = os.path.join(directory, str(step))
    try:
        meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:
        raise UserError(f"checkpoint {where} is unreadable ({first_line(e)})") from e
    saved = meta.get("config") if isinstance(meta, dict) else None
    saved = saved or _run_config(run_dir)
    if not saved or "model" not in saved:
        raise UserError(
            f"{where} records no model config, and {run_dir} has no config.yaml. "
            "Fix: give the run directory the checkpoint came from."
        )
    known = {k: v for k, v in saved.items() if k in ("model", "data")}
    cfg = from_dict(Config, known)
    model = _restore_params(mngr, step, cfg.model, where)
    return step, cfg, model


def _restore_params(
    mngr: ocp.CheckpointManager, step: int, cfg: ModelConfig, where: str
) -> Transformer:
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), nnx.to_pure_dict(state)
    )
    item = {"params": target}
    args = ocp.args.PyTreeRestore(
        item=item,
        restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=True,
    )
    try:
        params = mngr.restore(step, args=ocp.args.Composite(state=args))["state"]["params"]
    except Exception as e:
        raise UserError(
            f"checkpoint {where}: cannot read its parameters as model '{cfg.name}' "
            f"({first_line(e)}). Fix: give a checkpoint written by nnxtrain."
        ) from e
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def tokenizer_of(cfg: Config, run_dir: str) -> tuple[str | None, int | None, str | None]:
    """(tokenizer file to copy, its end-of-text id, a warning) of the run's data.tokenizer."""
    spec = cfg.data.tokenizer
    if not spec.endswith((".json", ".model")):
        return None, None, None  # byte, char, or none: nothing transformers could read
    candidates = [spec, os.path.join(run_dir, spec)]
    path = next((os.path.abspath(p) for p in candidates if os.path.isfile(p)), None)
    if path is None:
        return None, None, f"data.tokenizer {spec} not found; no tokenizer copied"
    from nnxtrain.data.tokenizer import CHAR_TYPE, load_tokenizer

    with open(path, encoding="utf-8", errors="replace") as f:
        if CHAR_TYPE in f.read(200):
            return None, None, None  # nnxtrain's char vocabulary: transformers cannot read it
    try:
        eos = load_tokenizer(path, cfg.data.eos_token).eos_id
    except Exception as e:  # the tokenizers package missing, or a damaged file
        return path, None, f"eos_token_id left unset: {first_line(e)}"
    return path, eos, None


def export(run_dir: str, out_dir: str, step: int | None = None, dtype: str | None = None) -> str:
    """Writes the HF directory; returns a one-line summary."""
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise UserError(f"{out_dir} is not empty. Fix: export to a new or empty directory.")
    step, cfg, model = read_checkpoint(run_dir, step)
    tokenizer, eos, warning = tokenizer_of(cfg, run_dir)
    if warning:
        print(f"nnxtrain-export: warning: {warning}", file=sys.stderr)
    files = save(model, out_dir, tokenizer_dir=tokenizer, dtype=dtype, eos_token_id=eos)
    return f"exported step {step} of {run_dir} to {out_dir}: {', '.join(files)}"


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point."""
    parser = argparse.ArgumentParser(
        prog="nnxtrain-export",
        description="Write a Hugging Face Llama directory (config.json, safetensors, "
        "tokenizer) from an nnxtrain run's checkpoint.",
    )
    parser.add_argument("run_dir", help="the run directory (or its checkpoints/ directory)")
    parser.add_argument("out_dir", help="the directory to write (new or empty)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step; default latest")
    parser.add_argument(
        "--dtype",
        choices=("bfloat16", "float32"),
        default=None,
        help="dtype of the written weights; default: as trained (model.param_dtype)",
    )
    args = parser.parse_args(argv)
    # Orbax reports each read-only option it sets, as an absl warning: noise here.
    logging.getLogger("absl").setLevel(logging.ERROR)
    try:
        print(export(args.run_dir, args.out_dir, args.step, args.dtype))
    except UserError as e:
        print(f"nnxtrain-export: {e}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


if __name__ == "__main__":
    main()
