"""`nnxtrain-export`: writes a Hugging Face Llama directory from a run's checkpoint.

    nnxtrain-export runs/a hf/a                      # the latest checkpoint, as trained
    nnxtrain-export runs/a hf/a --step 200 --dtype bfloat16

Reads only the parameters of `<run>/checkpoints/<step>/state` (Orbax, as the checkpointer
plugin writes it; `nnxtrain.checkpoint.reader`), and the model's shape from that step's
meta (the run's config.yaml if the meta has none); the tokenizer file of `data.tokenizer`
(a tokenizer.json or a SentencePiece .model) is copied, with the tokenizer_config.json,
special_tokens_map.json and chat_template.jinja beside it (a chat model keeps its
template), and its end-of-text id written to config.json. The checkpoint is opened
read-only. Bad input is one line on stderr and exit code 2.
"""

import argparse
import logging
import os
import shutil
import sys
from collections.abc import Sequence

from nnxtrain.checkpoint.model import read_model
from nnxtrain.config import Config
from nnxtrain.errors import UserError, first_line
from nnxtrain.interop.hf import save

EXIT_BAD_INPUT = 2


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


def export(run_dir: str, out_dir: str, step: int | None = None, dtype: str | None = None) -> str:
    """Writes the HF directory; returns a one-line summary."""
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise UserError(f"{out_dir} is not empty. Fix: export to a new or empty directory.")
    ckpt, cfg, model = read_model(run_dir, step, step_key="--step")
    step = ckpt.step
    tokenizer, eos, warning = tokenizer_of(cfg, run_dir)
    if warning:
        print(f"nnxtrain-export: warning: {warning}", file=sys.stderr)
    files = save(model, out_dir, tokenizer_dir=tokenizer, dtype=dtype, eos_token_id=eos)
    files += _copy_companions(tokenizer, out_dir)
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
