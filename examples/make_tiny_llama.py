"""Writes a tiny Llama-style Hugging Face model and a small chat data set to fine-tune it on:
the starting point of docs/finetune.md, made on a CPU in seconds, with nothing downloaded.

    python examples/make_tiny_llama.py OUT
    # OUT/model/      config.json, model.safetensors (random weights), tokenizer.json,
    #                 tokenizer_config.json (EOS and a chat template)
    # OUT/train.jsonl chat and prompt/completion records: the capitals of 24 countries
    # OUT/val.jsonl   held-out records: the same facts, asked in words the training set
    #                 uses for other countries

The tokenizer is a byte-level BPE (the `tokenizers` package: `pip install 'nnxtrain[data]'`)
trained on the records, with `<|endoftext|>` as EOS and `<|user|>`, `<|assistant|>` and
`<|system|>` as single tokens. Its chat template marks each assistant reply (and its EOS)
with `{% generation %}`, so `data=jsonl` trains on the replies only. The weights are
nnxtrain's own random initialisation, written by `nnxtrain.interop.hf.save` as a
`LlamaForCausalLM` directory (transformers reads it; torch is not needed here).
"""

import argparse
import importlib.util
import json
import os
import random
import sys
import tempfile

from flax import nnx

from nnxtrain.config import ModelConfig
from nnxtrain.interop.hf import save
from nnxtrain.model import Transformer

EOS = "<|endoftext|>"
ROLES = ("<|system|>", "<|user|>", "<|assistant|>")
# Each message: its role token, a newline, the content, a newline; the assistant's content
# and EOS are what the loss covers (the generation block). With add_generation_prompt the
# text ends with the assistant's role token, for `nnxtrain-generate` to continue.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% else %}{{ message['content'] }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
CAPITALS = {
    "France": "Paris",
    "Spain": "Madrid",
    "Italy": "Rome",
    "Germany": "Berlin",
    "Portugal": "Lisbon",
    "Austria": "Vienna",
    "Poland": "Warsaw",
    "Greece": "Athens",
    "Norway": "Oslo",
    "Sweden": "Stockholm",
    "Finland": "Helsinki",
    "Ireland": "Dublin",
    "Egypt": "Cairo",
    "Kenya": "Nairobi",
    "Japan": "Tokyo",
    "China": "Beijing",
    "India": "Delhi",
    "Peru": "Lima",
    "Chile": "Santiago",
    "Cuba": "Havana",
    "Canada": "Ottawa",
    "Mexico": "Mexico City",
    "Russia": "Moscow",
    "Turkey": "Ankara",
}
QUESTIONS = (
    "What is the capital of {country}?",
    "Which city is the capital of {country}?",
    "Name the capital of {country}.",
    "{country}: what is its capital city?",
)
SYSTEM = "You answer in one short sentence."


def records() -> tuple[list[dict], list[dict]]:
    """(train, val): each country's capital asked in three of the four ways for training
    (chat, one with a system prompt, and prompt/completion); the fourth is held out."""
    rng = random.Random(0)
    train, val = [], []
    for i, (country, city) in enumerate(CAPITALS.items()):
        answer = f"The capital of {country} is {city}."
        asks = [q.format(country=country) for q in QUESTIONS]
        held = asks.pop(i % len(asks))  # each wording is held out for a quarter of them
        train.append(chat(asks[0], answer))
        train.append(chat(asks[1], answer, system=SYSTEM))
        train.append({"prompt": f"Q: {asks[2]}\nA: ", "completion": answer})
        val.append(chat(held, answer))
    rng.shuffle(train)
    return train, val


def chat(question: str, answer: str, system: str = "") -> dict:
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


def write_tokenizer(out: str, texts: list[str]) -> tuple[int, int]:
    """A byte-level BPE of `texts` in out/tokenizer.json, with tokenizer_config.json;
    returns its vocabulary size and EOS id."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=[EOS, *ROLES],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.save(os.path.join(out, "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS,
        "bos_token": None,
        "pad_token": EOS,
        "model_max_length": 256,
        "chat_template": CHAT_TEMPLATE,
    }
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return int(tok.get_vocab_size()), int(tok.token_to_id(EOS))


def render(record: dict) -> str:
    """A record's text as training sees it (for the tokenizer to learn its pieces)."""
    if "messages" in record:
        return "".join(
            f"<|{m['role']}|>\n{m['content']}{EOS if m['role'] == 'assistant' else ''}\n"
            for m in record["messages"]
        )
    return record["prompt"] + record["completion"] + EOS


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", help="a new or empty directory")
    args = p.parse_args(argv)
    if importlib.util.find_spec("tokenizers") is None:  # checked before anything is written
        sys.exit("make_tiny_llama: needs the tokenizers package. Fix: pip install -e '.[data]'")
    if os.path.isdir(args.out) and os.listdir(args.out):
        sys.exit(f"make_tiny_llama: {args.out} is not empty. Fix: give a new or empty directory.")
    model_dir = os.path.join(args.out, "model")
    train, val = records()
    os.makedirs(args.out, exist_ok=True)
    for name, recs in (("train.jsonl", train), ("val.jsonl", val)):
        with open(os.path.join(args.out, name), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in recs)
    cfg = ModelConfig(
        name="tiny-llama",
        vocab_size=384,  # the tokenizer's at most (BPE stops early on a small corpus)
        emb_dim=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        mlp_dim=192,
        max_len=256,
    )
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        vocab, eos_id = write_tokenizer(tokenizer_dir, [render(r) for r in train + val])
        save(model, model_dir, tokenizer_dir=tokenizer_dir, eos_token_id=eos_id)
    print(
        f"wrote {model_dir} ({cfg.num_layers} layers, width {cfg.emb_dim}, vocabulary "
        f"{cfg.vocab_size}; tokenizer {vocab} tokens) and {len(train)} training, "
        f"{len(val)} held-out records in {args.out}"
    )


if __name__ == "__main__":
    main()
