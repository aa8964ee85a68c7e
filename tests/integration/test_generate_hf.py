"""Greedy `nnxtrain.generate` equals transformers' `generate(do_sample=False)` token for
token, for 32 new tokens, on a batch of prompts of different lengths (issue 14).

A small random `LlamaForCausalLM` is built from a `LlamaConfig` (no download), saved with
`save_pretrained` and read back with `nnxtrain.interop.hf.load`. nnxtrain generates the whole batch
at once, right-padded; transformers generates each row alone (its batched generation
left-pads, which moves positions: comparing row by row keeps both sides exact).
"""

import numpy as np
import pytest

hf = pytest.importorskip(
    "nnxtrain.interop.hf", reason="nnxtrain.interop.hf (HF weights in/out) is not here"
)
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from nnxtrain import generate  # noqa: E402

NEW = 32


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_greedy_generate_equals_transformers(tmp_path, kv_heads):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=64,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        initializer_range=0.2,  # logits that depend on the context
        # no end-of-sequence: both sides generate all 32 tokens (transformers would stop
        # at one, and suppressing it with min_new_tokens would change its argmax)
        bos_token_id=None,
        eos_token_id=None,
    )
    theirs = transformers.LlamaForCausalLM(config).eval()
    theirs.save_pretrained(tmp_path)
    ours = hf.load(str(tmp_path))

    lengths = np.array([5, 11, 2])
    prompts = np.random.default_rng(0).integers(0, 128, (3, 11)).astype(np.int32)
    got = np.asarray(generate(ours, prompts, max_new_tokens=NEW, prompt_lengths=lengths))

    for row, n in enumerate(lengths):
        ids = torch.tensor(prompts[row : row + 1, :n], dtype=torch.long)
        gen = transformers.GenerationConfig(max_new_tokens=NEW, do_sample=False, pad_token_id=0)
        with torch.no_grad():
            out = theirs.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen)
        assert out.shape == (1, n + NEW)
        np.testing.assert_array_equal(got[row], out[0, n:].numpy(), err_msg=f"row {row}")
