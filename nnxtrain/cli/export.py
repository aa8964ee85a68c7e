"""`nnxtrain-export`: writes a Hugging Face directory from a run's checkpoint, in the
model's own family (Llama, Qwen, Mistral, Gemma: `nnxtrain.hf`'s registry).

    nnxtrain-export runs/a hf/a                      # the latest checkpoint, as trained
    nnxtrain-export runs/a hf/a --step 200 --dtype bfloat16

Reads only the parameters of `<run>/checkpoints/<step>/state` (Orbax, as the checkpointer
plugin writes it; `nnxtrain.checkpoint.reader`), and the model's shape from that step's
meta (the run's config.yaml if the meta has none); the tokenizer file of `data.tokenizer`
(a tokenizer.json or a SentencePiece .model) is copied, with the tokenizer_config.json,
special_tokens_map.json and chat_template.jinja beside it (a chat model keeps its
template), and its end-of-text id written to config.json. The checkpoint is opened
read-only.

Bad input is one line on stderr and exit code 2, found before anything is written: no
checkpoint, an OUT_DIR that is a file, is not empty, or cannot be created (a file on its
path, no permission), parameters past float16's range for `--dtype float16`. A write
that fails on the way (the disk full), or Ctrl-C, removes what the export wrote, so that
OUT_DIR never holds half a model.
"""

import contextlib
import logging
import os
import shutil
import sys
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx
from rich.console import Console

from nnxtrain.checkpoint.model import read_model
from nnxtrain.cli.bad_input import ArgumentParser, bad_input
from nnxtrain.config import DTYPES, Config
from nnxtrain.errors import UserError, first_line
from nnxtrain.interop.hf import save
from nnxtrain.interop.init_from import load_params
from nnxtrain.interop.peft import merged, save_adapter
from nnxtrain.model import Transformer

PROG = "nnxtrain-export"
EXIT_INTERRUPTED = 130  # as a shell reports death by SIGINT


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


# Read by transformers beside a tokenizer file: its special tokens and chat template. They
# travel with it, so that a model fine-tuned on chat keeps the template it was trained with.
COMPANIONS = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def _copy_companions(tokenizer: str | None, out_dir: str) -> list[str]:
    """Copies the COMPANIONS beside a tokenizer.json / tokenizer.model; their names."""
    if tokenizer is None or os.path.basename(tokenizer) not in (
        "tokenizer.json",
        "tokenizer.model",
    ):
        return []
    copied = []
    for name in COMPANIONS:
        src = os.path.join(os.path.dirname(tokenizer), name)
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(out_dir, name))
            copied.append(name)
    return copied


def check_out_dir(out_dir: str) -> None:
    """Refuses an OUT_DIR that cannot become the export: a file, a directory that is not
    empty or not writable, or a new one that cannot be created. Creates nothing."""
    path = os.path.abspath(out_dir)
    fix = "Fix: give a new or empty directory that you can write to"
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"OUT_DIR {out_dir} is a file, not a directory. {fix}")
    if os.path.isdir(path):
        if os.listdir(path):
            raise UserError(
                f"OUT_DIR {out_dir} is not empty. Fix: export to a new or empty directory"
            )
        if not os.access(path, os.W_OK | os.X_OK):
            raise UserError(f"OUT_DIR {out_dir}: no permission to write in it. {fix}")
        return
    parent = os.path.dirname(path)
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UserError(f"OUT_DIR {out_dir} cannot be created: {parent} is a file. {fix}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(
            f"OUT_DIR {out_dir} cannot be created: no permission to write in {parent}. {fix}"
        )


def check_float16(model: Transformer) -> None:
    """Refuses a float16 export of parameters past float16's range: they would be written
    as infinities (bfloat16 has float32's range)."""
    limit = float(np.finfo(np.float16).max)
    for path, value in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        peak = float(jnp.max(jnp.abs(value.get_value())))
        if peak > limit:
            name = ".".join(map(str, path))
            raise UserError(
                f"--dtype float16: the parameter {name} reaches {peak:.4g}, past float16's "
                f"largest value {limit:g} (it would be written as inf). Fix: export with "
                "--dtype bfloat16 or float32"
            )


def export(
    run_dir: str,
    out_dir: str,
    step: int | None = None,
    dtype: str | None = None,
    lora: str = "",
) -> str:
    """Writes the HF directory (a LoRA run: `lora` = "adapter" for PEFT's adapter files, or
    "merge" for the merged weights); returns a one-line summary."""
    check_out_dir(out_dir)
    ckpt, cfg, model = read_model(run_dir, step, step_key="--step", load_base=_load_base)
    step = ckpt.step
    is_lora = cfg.model.lora.rank > 0
    if lora and not is_lora:
        raise UserError(
            f"--{lora}: {ckpt.path} is not a LoRA run (model.lora.rank is 0). Fix: export "
            "without --adapter or --merge"
        )
    if is_lora and not lora:
        raise UserError(
            f"{ckpt.path} holds LoRA adapters. Fix: add --adapter (PEFT's adapter files) or "
            "--merge (the base with the adapters merged in)"
        )
    if lora == "merge":
        model = merged(model)
    if (dtype or cfg.model.param_dtype) == "float16":
        check_float16(model)
    tokenizer, eos, warning = tokenizer_of(cfg, run_dir)
    if warning:
        print(f"{PROG}: warning: {warning}", file=sys.stderr)
    path = os.path.abspath(out_dir)
    existed = os.path.isdir(path)
    created = path  # the outermost directory this export creates
    while not os.path.lexists(os.path.dirname(created)):
        created = os.path.dirname(created)
    try:
        if lora == "adapter":
            base = str((ckpt.lora_base or {}).get("init_from") or "")
            files = save_adapter(model, out_dir, base)
        else:
            files = save(model, out_dir, tokenizer_dir=tokenizer, dtype=dtype, eos_token_id=eos)
            files += _copy_companions(tokenizer, out_dir)
    except BaseException as e:  # Ctrl-C too: no half-written model is left behind
        _remove_written(path, None if existed else created)
        if isinstance(e, OSError):
            raise UserError(
                f"OUT_DIR {out_dir}: the export could not be written ({first_line(e)}), and "
                "what it wrote was removed. Fix: free disk space, or export elsewhere"
            ) from e
        raise
    what = (
        {"adapter": "the LoRA adapters of ", "merge": "the merged LoRA model of "}[lora]
        if lora
        else ""
    )
    return f"exported {what}step {step} of {run_dir} to {out_dir}: {', '.join(files)}"


def _load_base(config: Config, params: Any) -> Any:
    """A LoRA run's base: run.init_from's weights into `params` (quietly)."""
    return load_params(config, params, None, Console(quiet=True))


def _remove_written(path: str, created: str | None) -> None:
    """Removes what an export wrote: the directories it created, or else the contents of
    the empty directory it was given."""
    with contextlib.suppress(OSError):
        if created is not None:
            shutil.rmtree(created)
            return
        for name in os.listdir(path):
            entry = os.path.join(path, name)
            if os.path.isdir(entry) and not os.path.islink(entry):
                shutil.rmtree(entry)
            else:
                os.remove(entry)


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point."""
    parser = ArgumentParser(
        prog=PROG,
        description="Write a Hugging Face directory in the model's family (config.json, "
        "safetensors, tokenizer) from an nnxtrain run's checkpoint.",
    )
    parser.add_argument("run_dir", help="the run directory (or its checkpoints/ directory)")
    parser.add_argument("out_dir", help="the directory to write (new or empty)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step; default latest")
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default=None,
        help="dtype of the written weights; default: as trained (model.param_dtype)",
    )
    lora = parser.add_mutually_exclusive_group()
    lora.add_argument(
        "--adapter",
        action="store_true",
        help="a LoRA run: write PEFT's adapter_config.json and adapter_model.safetensors",
    )
    lora.add_argument(
        "--merge",
        action="store_true",
        help="a LoRA run: write the full model, the adapters merged in (float32, then cast)",
    )
    args = parser.parse_args(argv)
    # Orbax reports each read-only option it sets, as an absl warning: noise here.
    logging.getLogger("absl").setLevel(logging.ERROR)
    try:
        mode = "adapter" if args.adapter else "merge" if args.merge else ""
        print(export(args.run_dir, args.out_dir, args.step, args.dtype, mode))
    except UserError as e:
        bad_input(PROG, e)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted: nothing was left in {args.out_dir}", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    main()
