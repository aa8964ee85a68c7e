"""Generation speed on CPU: `nnxtrain.generate` against transformers' `generate` (PyTorch).

The same small Llama (4 layers, 256 wide, GQA 4 query / 2 kv heads, float32) continues a
128-token prompt by 128 greedy tokens, at batch 1 and 8. The Hugging Face model is built
from a `LlamaConfig` with random weights; nnxtrain loads it with `nnxtrain.interop.hf.load` when
that module exists, else builds its own random model of the same shape (speed does not
depend on the weights). Each side is warmed up once (nnxtrain compiles there), then the
repetitions alternate between the two sides; medians are reported. Prints tokens/s (new
tokens over the whole call, prefill included), the ratio nnxtrain/transformers (goal >=
1.0) and the decode step time: (time for 128 new tokens - time for 1) / 127.

    python bench/generate_speed.py [--reps 3] [--vocab 32000] [--batches 1 8] [--torch-threads N]
"""

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable

import jax
import numpy as np
import torch
from flax import nnx
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from nnxtrain import generate
from nnxtrain.config import ModelConfig
from nnxtrain.model import Transformer

LAYERS, WIDTH, HEADS, KV_HEADS, MLP = 4, 256, 4, 2, 768
PROMPT, NEW = 128, 128


def hf_model(vocab: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=WIDTH,
        intermediate_size=MLP,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=PROMPT + NEW,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).eval()


def nnx_model(hf: LlamaForCausalLM, vocab: int) -> tuple[Transformer, str]:
    try:
        from nnxtrain import hf as interop  # type: ignore[attr-defined]
    except ImportError:
        cfg = ModelConfig(
            vocab_size=vocab,
            emb_dim=WIDTH,
            num_layers=LAYERS,
            num_heads=HEADS,
            num_kv_heads=KV_HEADS,
            head_dim=WIDTH // HEADS,
            mlp_dim=MLP,
            max_len=PROMPT + NEW,
            dtype="float32",
        )
        return Transformer(cfg, rngs=nnx.Rngs(0)), "own random weights (no nnxtrain.interop.hf)"
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        return interop.load(d), "the same weights, via nnxtrain.interop.hf.load"


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--torch-threads", type=int, default=0, help="0 = torch's default")
    args = p.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    hf = hf_model(args.vocab)
    model, weights = nnx_model(hf, args.vocab)
    print(
        f"model: {LAYERS} layers, {WIDTH} wide, {HEADS}/{KV_HEADS} heads, mlp {MLP}, vocab "
        f"{args.vocab}; prompt {PROMPT} + {NEW} new tokens, greedy, float32; nnxtrain: "
        f"{weights}; jax {jax.__version__} ({jax.default_backend()}), torch "
        f"{torch.__version__} ({torch.get_num_threads()} threads)"
    )
    print(
        f"{'batch':>5} | {'nnxtrain tok/s':>14} | {'transformers tok/s':>18} | {'ratio':>5} | "
        f"{'nnxtrain step':>13} | {'transformers step':>17}"
    )
    for batch in args.batches:
        prompts = np.random.default_rng(batch).integers(0, args.vocab, (batch, PROMPT))
        ids = torch.tensor(prompts)

        def ours(n: int, prompts: np.ndarray = prompts) -> None:
            np.asarray(generate(model, prompts, max_new_tokens=n))

        def theirs(n: int, ids: torch.Tensor = ids) -> None:
            gen = GenerationConfig(
                max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
            )
            with torch.no_grad():
                out = hf.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen)
            assert out.shape[1] == PROMPT + n

        for n in (NEW, 1):  # warm-up: compilation (nnxtrain), allocator and caches (both)
            ours(n)
            theirs(n)
        times: dict[str, list[float]] = {"ours": [], "theirs": [], "ours1": [], "theirs1": []}
        for _ in range(args.reps):
            times["ours"].append(timed(lambda: ours(NEW)))
            times["theirs"].append(timed(lambda: theirs(NEW)))
            times["ours1"].append(timed(lambda: ours(1)))
            times["theirs1"].append(timed(lambda: theirs(1)))
        med = {k: statistics.median(v) for k, v in times.items()}
        rate_ours, rate_theirs = batch * NEW / med["ours"], batch * NEW / med["theirs"]
        step_ours = (med["ours"] - med["ours1"]) / (NEW - 1) * 1e3
        step_theirs = (med["theirs"] - med["theirs1"]) / (NEW - 1) * 1e3
        print(
            f"{batch:>5} | {rate_ours:>14.0f} | {rate_theirs:>18.0f} | "
            f"{rate_ours / rate_theirs:>5.2f} | {step_ours:>10.2f} ms | {step_theirs:>14.2f} ms"
        )


if __name__ == "__main__":
    main()
