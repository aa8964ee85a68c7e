"""The `nnxtrain-generate` command: text from a trained run or a Hugging Face directory.

    nnxtrain-generate runs/a --prompt "Once upon a time" --max-new-tokens 200
    nnxtrain-generate path/to/hf_dir --prompt "The capital of France" --temperature 0.8 --top-p 0.95
    nnxtrain-generate path/to/hf_dir --adapter path/to/peft_adapter --prompt "Hello"

SOURCE is an nnxtrain run directory (the parameters of its latest checkpoint; the model's
shape and the tokenizer from the config saved with that checkpoint) or a Hugging Face
directory holding config.json (read by `nnxtrain.interop.hf.load`, with its tokenizer.json or
tokenizer.model), with `--adapter` a PEFT LoRA adapter on it; a LoRA run's adapters come
over the base it was trained on (`run.init_from`). An empty prompt starts a new document:
the end-of-sequence token for a run (documents are separated by it in training), the BOS
token for a Hugging Face model.

The text is printed as it is decoded, one block of `--block` tokens at a time (each block
is one call of the compiled decode loop, which compiles once), and generation stops at
the tokenizer's end-of-sequence token. A last line on stderr gives the token count and the
decode rate in tokens/s, measured over the blocks after the first (the first call
compiles). Bad input (no checkpoint, a directory that is neither kind, a prompt longer
than the model's max_len, a prompt that is not valid UTF-8, a seed outside 0..2**32-1, a
KV cache larger than the memory free) ends with one line on stderr and exit code 2. A
`--block` larger than the tokens to generate is one block of them all.
"""

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from nnxtrain.cli.bad_input import ArgumentParser, bad_input
from nnxtrain.errors import UserError, first_line
from nnxtrain.model.generation import MAX_SEED

PROG = "nnxtrain-generate"


def seed(text: str) -> int:
    """--seed's value: an integer in 0..MAX_SEED."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(
            f"{text} is not an integer in 0..{MAX_SEED}. Fix: give a seed in that range"
        )
    return value


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("source", metavar="SOURCE", help="an nnxtrain run dir or a Hugging Face dir")
    p.add_argument("--prompt", required=True, help="the text to continue ('' = a new document)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest; 0 = all")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus mass to sample from")
    p.add_argument("--seed", type=seed, default=0, help=f"sampling seed, 0..{MAX_SEED}")
    p.add_argument("--block", type=int, default=16, help="tokens per streamed block")
    p.add_argument(
        "--adapter", default="", help="a PEFT LoRA adapter dir to apply to SOURCE (an HF dir)"
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point."""
    args = parse(argv)
    try:
        _generate(args)
    except UserError as e:
        bad_input(PROG, e)


def _generate(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 1 or args.block < 1:
        raise UserError("--max-new-tokens and --block must be >= 1. Fix: give positive counts")
    check_prompt(args.prompt)
    model, tokenizer, ids = load_source(args.source, args.prompt, args.adapter)
    from nnxtrain.model.generation import stream

    max_len = model.cfg.max_len
    if len(ids) >= max_len:
        raise UserError(
            f"--prompt: {len(ids)} tokens, but the model's max_len is {max_len}. "
            f"Fix: give a prompt of fewer than {max_len} tokens"
        )
    new = min(args.max_new_tokens, max_len - len(ids))
    if new < args.max_new_tokens:
        print(f"(generating {new} tokens: the model's max_len is {max_len})", file=sys.stderr)
    out = Printer(tokenizer)
    times: list[tuple[float, int]] = []
    start = time.perf_counter()
    for block in stream(
        model,
        np.array([ids], np.int32),
        max_new_tokens=new,
        block=args.block,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        eos_id=tokenizer.eos_id,
    ):
        stopped = out.add([int(t) for t in block[0]])
        times.append((time.perf_counter(), len(block[0])))
        if stopped:
            break
    out.finish()
    print(f"\n{rate(start, times, out.count)}", file=sys.stderr)


def check_prompt(prompt: str) -> None:
    """Refuses a prompt that is not Unicode text. Bytes of the command line that are not
    valid UTF-8 reach Python as lone surrogates (U+DC80..U+DCFF, PEP 383), which no
    tokenizer can encode: they are named rather than guessed at."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(prompt[e.start])
        what = (
            f"the byte 0x{code - 0xDC00:02x}"
            if 0xDC80 <= code <= 0xDCFF
            else f"a lone surrogate U+{code:04X}"
        )
        raise UserError(
            f"--prompt: not valid UTF-8 ({what} at character {e.start}). Fix: give the "
            "prompt as UTF-8 text (iconv -t UTF-8 converts other encodings)"
        ) from None


def rate(start: float, times: list[tuple[float, int]], count: int) -> str:
    """`N tokens in S s | R tokens/s`; R over the blocks after the first decode block (the
    first two entries, the prefill's token and that block, include the compilations)."""
    total = times[-1][0] - start
    line = f"{count} tokens in {total:.2f} s"
    if len(times) > 2:
        steady = sum(n for _, n in times[2:])
        line += f" | {steady / (times[-1][0] - times[1][0]):.1f} tokens/s decoding"
        line += f" | {times[1][0] - start:.2f} s to the first block (compiling)"
    else:
        line += f" | {count / total:.1f} tokens/s, compilation included (use more tokens)"
    return line


class Printer:
    """Prints the decoded text as ids arrive, stopping at the end-of-sequence id."""

    def __init__(self, tokenizer: Any):
        self.tokenizer, self.shown, self.count = tokenizer, "", 0
        self.ids: list[int] = []

    def add(self, ids: list[int]) -> bool:
        """Prints what the new ids add to the text; True once eos was seen."""
        eos = self.tokenizer.eos_id
        stop = eos in ids
        ids = ids[: ids.index(eos)] if stop else ids
        self.ids += ids
        self.count += len(ids) + stop
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # a character cut between tokens: wait for its rest
            text = text.rstrip("\ufffd")
        if text.startswith(self.shown):
            sys.stdout.write(text[len(self.shown) :])
            sys.stdout.flush()
            self.shown = text
        return stop

    def finish(self) -> None:
        text = self.tokenizer.decode(self.ids)
        if text.startswith(self.shown):
            sys.stdout.write(text[len(self.shown) :])
        sys.stdout.flush()


def load_source(source: str, prompt: str, adapter: str = "") -> tuple[Any, Any, list[int]]:
    """(model, tokenizer, prompt ids) from a run dir or a Hugging Face dir (with a PEFT
    `adapter` dir on it)."""
    path = os.path.abspath(os.path.expanduser(source))
    if not os.path.isdir(path):
        raise UserError(f"SOURCE: no such directory {source!r}. Fix: give a run dir or HF dir")
    if os.path.isfile(os.path.join(path, "config.json")):
        model, tokenizer, ids = _load_hf(path, prompt)
        if adapter:
            from rich.console import Console

            from nnxtrain.interop.peft import attach_adapter

            model = attach_adapter(model, adapter, Console(stderr=True, quiet=True))
        return model, tokenizer, ids
    if adapter:
        raise UserError(
            "--adapter: SOURCE is a run dir, whose LoRA adapters (if any) come with it. "
            "Fix: give the adapter's base model dir as SOURCE, or drop --adapter"
        )
    return _load_run(path, prompt)


def _load_run(path: str, prompt: str) -> tuple[Any, Any, list[int]]:
    from rich.console import Console

    from nnxtrain.checkpoint.model import read_model
    from nnxtrain.data import run_tokenizer
    from nnxtrain.interop.init_from import load_params

    def load_base(config: Any, params: Any) -> Any:  # a LoRA run's run.init_from
        return load_params(config, params, None, Console(quiet=True))

    _, cfg, model = read_model(path, load_base=load_base)
    tokenizer = run_tokenizer(cfg, path)
    if tokenizer is None:
        raise UserError(
            f"SOURCE: the run in {path} has no tokenizer (data={cfg.data.name}), so a "
            "text prompt cannot be encoded. Fix: generate from Python with token ids"
        )
    ids = [int(i) for i in tokenizer.encode([prompt])] or [tokenizer.eos_id]
    return model, tokenizer, ids


def _load_hf(path: str, prompt: str) -> tuple[Any, Any, list[int]]:
    try:
        from nnxtrain import hf  # type: ignore[attr-defined]
    except ImportError as e:
        raise UserError(
            f"SOURCE: {path} is a Hugging Face dir, but this nnxtrain has no nnxtrain.interop.hf "
            f"({first_line(e)}). Fix: install an nnxtrain with Hugging Face support"
        ) from e
    from nnxtrain.data.tokenizer import load_tokenizer

    model = hf.load(path)
    names = [n for n in ("tokenizer.json", "tokenizer.model") if os.path.isfile(f"{path}/{n}")]
    if not names:
        raise UserError(
            f"SOURCE: {path} has no tokenizer.json or tokenizer.model. Fix: copy the "
            "model's tokenizer files into it"
        )
    tokenizer = load_tokenizer(os.path.join(path, names[0]))
    ids = [int(i) for i in tokenizer.encode([prompt])]
    bos = _hf_bos(path)
    if bos is not None:  # what transformers' Llama tokenizers put before a prompt
        ids = [bos, *ids]
    if not ids:
        raise UserError("--prompt: empty, and the model has no BOS token. Fix: give a prompt")
    return model, tokenizer, ids


def _hf_bos(path: str) -> int | None:
    """config.json's bos_token_id when the tokenizer adds it (tokenizer_config.json's
    add_bos_token, true for Llama tokenizers when absent and a BOS id exists)."""
    try:
        with open(os.path.join(path, "config.json")) as f:
            bos = json.load(f).get("bos_token_id")
        tok_cfg: dict[str, Any] = {}
        if os.path.isfile(os.path.join(path, "tokenizer_config.json")):
            with open(os.path.join(path, "tokenizer_config.json")) as f:
                tok_cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"SOURCE: cannot read {path}'s config ({first_line(e)})") from e
    return int(bos) if isinstance(bos, int) and tok_cfg.get("add_bos_token", True) else None


if __name__ == "__main__":
    main()
