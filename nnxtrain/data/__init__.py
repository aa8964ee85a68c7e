"""Datasets that feed the trainer batches of inputs, targets and weights.

    data = build_dataset(cfg)                       # what `data.name` selects
    cfg = resolve_vocab(cfg, data)                  # model.vocab_size from the tokenizer
    rows = process_rows(batch_sharding, batch_size) # this process's rows (None: all)
    data.batch(step, batch_size, seq_len, split="train", rows=rows)

Kinds: `synthetic` (a Markov source with a known loss floor, `synthetic.py`), `text` (UTF-8
files tokenized at start-up, `text.py` + `tokenizer.py`), `tokens` (pre-tokenized
`.npy`/`.bin` files, memory-mapped, `tokens.py`) and `jsonl` (records with loss masks,
`jsonl.py` + `chat.py`) and `preference` (prompt, chosen and rejected replies for DPO,
`preference.py`). Text and tokens are packed into fixed-length sequences with a
held-out split by `packing.PackedData`; jsonl records are packed whole into rows, with
segment ids and positions, by `documents.DocumentData`. Every dataset's
`batch(step, ...)` is a pure function of (run.seed, step), so a resumed run reads exactly
the batches the uninterrupted run would have; see docs/data.md. `document_mask(cfg, ...)`
resolves data.document_mask per kind: a dataset whose `document_mask` is true also gives
`segment_ids` and `positions`, so that packed documents never attend to each other; its
`count_tokens(step, ...)` counts a batch's non-padding places (tokens/s). `run_tokenizer(cfg,
run_dir)` gives back the tokenizer of a run's text (to generate from the model).
"""

import dataclasses
import os
from typing import Any

import jax
import numpy as np

from nnxtrain.config import Config
from nnxtrain.data.batch import Batch
from nnxtrain.data.chat import special_token, tokenizer_config
from nnxtrain.data.documents import DocumentData
from nnxtrain.data.jsonl import Fields, RecordReader, check_loss, describe_files
from nnxtrain.data.packing import PackedData, TokenStream
from nnxtrain.data.preference import PairReader, PreferenceData
from nnxtrain.data.synthetic import MarkovSource, SyntheticData
from nnxtrain.data.text import (
    as_list,
    encode_files,
    expand_paths,
    iter_texts,
    log,
    unescape,
)
from nnxtrain.data.tokenizer import (
    ByteTokenizer,
    CharTokenizer,
    HFTokenizer,
    RecordTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    load_tokenizer,
)
from nnxtrain.data.tokens import open_token_files, read_meta
from nnxtrain.errors import ConfigError

__all__ = [
    "CHAR_VOCAB",
    "Batch",
    "DocumentData",
    "MarkovSource",
    "PackedData",
    "SyntheticData",
    "TokenStream",
    "build_dataset",
    "document_mask",
    "process_rows",
    "resolve_vocab",
    "run_tokenizer",
]

CHAR_VOCAB = "char_vocab.json"  # the char tokenizer's vocabulary, in the run directory


def build_dataset(cfg: Config) -> Any:
    """The dataset `data.name` selects (validated in `nnxtrain.config`)."""
    d = cfg.data
    if d.name == "synthetic":
        return SyntheticData(cfg.model.vocab_size, d.branching, d.source_seed, cfg.run.seed)
    builders: dict[str, Any] = {
        "text": _build_text,
        "tokens": _build_tokens,
        "jsonl": _build_jsonl,
        "preference": _build_preference,
    }
    data = builders[d.name](cfg)
    batch = cfg.run.batch_size if cfg.run.batch_size > 0 else jax.device_count()
    data.check(batch, cfg.run.seq_len, evaluate=cfg.run.eval_every > 0)
    if jax.process_index() == 0:
        print(data.describe(), flush=True)
    return data


def document_mask(cfg: Config, eos_known: bool = True) -> bool:
    """Whether data.document_mask is on for this run: `auto` is on where the documents are
    known (jsonl; text; tokens whose EOS id is known: `eos_known`), never for synthetic."""
    d, mask = cfg.data, cfg.data.document_mask
    if mask is False or d.name == "synthetic":  # (synthetic with true: refused by the checks)
        return False
    if not eos_known:
        if mask is True:
            raise ConfigError(
                "data.document_mask",
                "true needs the end-of-document id, and these token files come with no "
                "meta.json and no tokenizer",
                "give data.tokenizer, data.eos_token=ID, or the corpus's meta.json; "
                "or set data.document_mask=auto",
            )
        return False
    return True


def resolve_vocab(cfg: Config, dataset: Any) -> Config:
    """`cfg` with model.vocab_size set to the dataset's tokenizer's (when it has one and
    data.vocab_size_from_tokenizer is true); a model vocabulary too small is an error."""
    vocab = getattr(dataset, "vocab_size", None)
    if vocab is None or cfg.model.vocab_size == vocab:
        return cfg
    if cfg.data.vocab_size_from_tokenizer:
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab))
    if cfg.model.vocab_size < vocab and cfg.run.init_from:  # the weights fix the vocabulary
        raise ConfigError(
            "data.tokenizer",
            f"has {vocab} tokens, more than the {cfg.model.vocab_size} of the model of "
            f"run.init_from={cfg.run.init_from}",
            "give the tokenizer that model was trained with, or leave data.tokenizer empty",
        )
    if cfg.model.vocab_size < vocab:
        raise ConfigError(
            "model.vocab_size",
            f"{cfg.model.vocab_size} is smaller than the tokenizer's {vocab} tokens",
            f"set model.vocab_size>={vocab}, or data.vocab_size_from_tokenizer=true",
        )
    return cfg


def process_rows(sharding: jax.sharding.Sharding, batch_size: int) -> np.ndarray | None:
    """The global batch rows this process's devices hold, sorted; None when it holds all."""
    held: set[int] = set()
    for index in sharding.addressable_devices_indices_map((batch_size, 1)).values():
        rows = index[0] if index is not None else slice(None)
        held.update(range(*rows.indices(batch_size)))
    return None if len(held) == batch_size else np.array(sorted(held), np.int64)


def run_tokenizer(cfg: Config, run_dir: str) -> Tokenizer | None:
    """The tokenizer a run's text goes through (to encode prompts and decode samples):
    `data.tokenizer`, with a char vocabulary read from `run_dir`; None when the run has
    none (synthetic data, or token files given without data.tokenizer)."""
    d = cfg.data
    if d.name == "synthetic" or (d.name == "tokens" and not d.tokenizer):
        return None
    if d.tokenizer in ("", "byte"):
        return ByteTokenizer()
    if d.tokenizer == "char":
        return CharTokenizer.load(os.path.join(run_dir, CHAR_VOCAB))
    return load_tokenizer(d.tokenizer, d.eos_token)


# -- builders ----------------------------------------------------------------------------


def _text_tokenizer(cfg: Config, files: list[str]) -> Tokenizer:
    d = cfg.data
    if d.tokenizer in ("", "byte"):
        return ByteTokenizer()
    if d.tokenizer != "char":
        return load_tokenizer(d.tokenizer, d.eos_token)
    saved = os.path.join(cfg.run.dir, CHAR_VOCAB) if cfg.run.dir else ""
    if saved and os.path.isfile(saved):  # a resumed run: tokenize exactly as before
        return CharTokenizer.load(saved)
    tok = CharTokenizer.build(iter_texts(files, unescape(d.doc_separator)))
    if saved and jax.process_index() == 0:
        tok.save(saved)
    return tok


def _packed(
    cfg: Config,
    train: TokenStream,
    val: TokenStream | None,
    eos_id: int,
    vocab_size: int | None,
    tokenizer: str,
    digest: str,
    eos_known: bool = True,
) -> PackedData:
    d = cfg.data
    if val is None and d.val_fraction > 0:
        held = round(len(train) * d.val_fraction)
        train, val = train.split(len(train) - held)
    return PackedData(
        train,
        val,
        kind=d.name,
        seed=cfg.run.seed,
        shuffle=d.shuffle,
        eos_id=eos_id,
        vocab_size=vocab_size,
        id_limit=vocab_size or cfg.model.vocab_size,
        tokenizer=tokenizer,
        tokenizer_digest=digest,
        prefetch=d.prefetch,
        val_key="data.val_path" if as_list(d.val_path) else "data.val_fraction",
        document_mask=document_mask(cfg, eos_known),
        seq_len=cfg.run.seq_len,
    )


def _record_tokenizer(cfg: Config) -> RecordTokenizer:
    d = cfg.data
    if d.tokenizer in ("", "byte"):
        return ByteTokenizer()
    tok = load_tokenizer(d.tokenizer, d.eos_token)
    if not isinstance(tok, HFTokenizer | SentencePieceTokenizer):  # a char_vocab.json
        raise ConfigError("data.tokenizer", "data=jsonl cannot use a char vocabulary", "use byte")
    # EOS follows the tokenizer as transformers reads it: tokenizer_config.json's eos_token
    # (often the end-of-turn token of a chat model) wins over the tokenizer file's guess
    named = None if d.eos_token else special_token(tokenizer_config(tok.path), "eos_token")
    if named and named != tok.eos_text:
        tok = type(tok)(tok.path, named)
    return tok


def _build_jsonl(cfg: Config) -> DocumentData:
    d = cfg.data
    files = expand_paths(d.path, "data.path")
    val_files = expand_paths(d.val_path, "data.val_path") if as_list(d.val_path) else []
    tok = _record_tokenizer(cfg)
    fields = Fields(d.text_field, d.prompt_field, d.completion_field, d.messages_field)
    reader = RecordReader(
        tok,
        fields,
        seq_len=cfg.run.seq_len,
        truncate=d.truncate,
        skip_bad=d.skip_bad_records,
        chat_template=d.chat_template,
    )
    train = reader.read(files, "data.path")
    if not len(train):
        raise ConfigError(
            "data.path",
            f"no usable record in {', '.join(files[:3])} ({reader.report()})",
            "give records in a shape docs/data.md lists",
        )
    val = reader.read(val_files, "data.val_path") if val_files else None
    if reader.bad:
        log.warning("data.path: %s", reader.bad_summary())
    why, val_why = reader.why[: len(train)], reader.why[len(train) :]
    val_key, held_out, what = "data.val_path", describe_files(val_files), describe_files(files)
    if val is None and d.val_fraction > 0 and len(train) > 1:  # whole records, from the end
        held = min(max(round(len(train) * d.val_fraction), 1), len(train) - 1)
        train, val = train.split(len(train) - held)
        why, val_why = why[: len(train)], why[len(train) :]
        val_key, held_out = "data.val_fraction", f"the held-out last {held:,} records"
        what += f" (less the held-out last {held:,})"
    # A split with no loss token would train (or evaluate) on nothing: every step a loss of 0
    check_loss(why, "data.path", what)
    if cfg.run.eval_every > 0:
        check_loss(val_why, val_key, held_out)
    return DocumentData(
        train,
        val,
        seq_len=cfg.run.seq_len,
        seed=cfg.run.seed,
        shuffle=d.shuffle,
        eos_id=tok.eos_id,
        vocab_size=tok.vocab_size,
        tokenizer=tok.describe(),
        tokenizer_digest=tok.digest(),
        prefetch=d.prefetch,
        summary=reader.report(),
        val_key="data.val_path" if val_files else "data.val_fraction",
        document_mask=document_mask(cfg),
    )


def _build_preference(cfg: Config) -> PreferenceData:
    d = cfg.data
    tok = _record_tokenizer(cfg)
    reader = PairReader(
        tok,
        seq_len=cfg.run.seq_len,
        max_prompt=d.max_prompt_len,
        max_reply=d.max_completion_len,
        truncate=d.truncate,
        skip_bad=d.skip_bad_records,
        chat_template=d.chat_template,
    )
    pairs = reader.read(expand_paths(d.path, "data.path"), "data.path")
    if not len(pairs):
        raise ConfigError(
            "data.path",
            f"no usable pair ({reader.report()})",
            'give lines of {"prompt", "chosen", "rejected"} (docs/preference.md)',
        )
    val = None
    if as_list(d.val_path):
        val = reader.read(expand_paths(d.val_path, "data.val_path"), "data.val_path")
    elif cfg.run.eval_every > 0 and d.val_fraction > 0 and len(pairs) > 1:  # from the end
        held = min(max(round(len(pairs) * d.val_fraction), 1), len(pairs) - 1)
        pairs, val = pairs.split(len(pairs) - held)
    return PreferenceData(
        pairs,
        val,
        seq_len=cfg.run.seq_len,
        seed=cfg.run.seed,
        shuffle=d.shuffle,
        eos_id=tok.eos_id,
        vocab_size=tok.vocab_size,
        tokenizer=tok.describe(),
        tokenizer_digest=tok.digest(),
        prefetch=d.prefetch,
        summary=reader.report(),
    )


def _build_text(cfg: Config) -> PackedData:
    d = cfg.data
    files = expand_paths(d.path, "data.path")
    val_files = expand_paths(d.val_path, "data.val_path") if as_list(d.val_path) else []
    tok, sep = _text_tokenizer(cfg, files), unescape(d.doc_separator)
    train = TokenStream([encode_files(files, tok, sep, "data.path")], files)
    val = None
    if val_files:
        tokens = encode_files(val_files, tok, sep, "data.val_path")
        val = TokenStream([tokens], val_files)
    return _packed(cfg, train, val, tok.eos_id, tok.vocab_size, tok.describe(), tok.digest())


def _build_tokens(cfg: Config) -> PackedData:
    d = cfg.data
    files = expand_paths(d.path, "data.path")
    meta = read_meta(files, "data.path")
    train = TokenStream(open_token_files(files, d.token_dtype, "data.path", meta), files)
    val = None
    if as_list(d.val_path):
        val_files = expand_paths(d.val_path, "data.val_path")
        val_meta = read_meta(val_files, "data.val_path") or meta
        arrays = open_token_files(val_files, d.token_dtype, "data.val_path", val_meta)
        val = TokenStream(arrays, val_files)
    if d.tokenizer:  # (not char: nnxtrain.config refuses it for data=tokens)
        tok = load_tokenizer(d.tokenizer, d.eos_token)
        if meta and meta.get("vocab_size") not in (None, tok.vocab_size):
            raise ConfigError(
                "data.tokenizer",
                f"has {tok.vocab_size} tokens but the corpus was made with "
                f"{meta['vocab_size']} ({meta.get('tokenizer', '?')})",
                "give the tokenizer the corpus was made with, or leave it empty",
            )
        vocab, eos, name, digest = tok.vocab_size, tok.eos_id, tok.describe(), tok.digest()
    elif meta:
        vocab, eos = int(meta["vocab_size"]), int(meta["eos_id"])
        name, digest = str(meta.get("tokenizer", "")), str(meta.get("tokenizer_digest", ""))
    else:  # no tokenizer known: keep model.vocab_size and check ids against it
        vocab, name, digest = None, "", ""
        eos = _eos_id(d.eos_token)
    # padding is id 0 where no EOS is known (it is never a target: weight 0)
    return _packed(cfg, train, val, max(eos, 0), vocab, name, digest, eos_known=eos >= 0)


def _eos_id(eos_token: str) -> int:
    """data=tokens without a tokenizer or meta.json: data.eos_token as an id (-1: none)."""
    if not eos_token:
        return -1
    if not eos_token.isdigit():
        raise ConfigError(
            "data.eos_token",
            f"{eos_token!r} is not a token id, and these token files have no tokenizer",
            "give the id (data.eos_token=2), or data.tokenizer",
        )
    return int(eos_token)
