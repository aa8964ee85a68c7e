"""Parameter counts and FLOPs per step: against a built model and against hand arithmetic."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from nnxtrain import compose
from nnxtrain.config import ModelConfig
from nnxtrain.model import Transformer
from nnxtrain.train.accounting import count_params, matmul_params, step_flops

# vocab 16, width 8, 2 layers, 4 query heads sharing 2 kv heads of 4 features, MLP 12.
HAND = ModelConfig(
    vocab_size=16,
    emb_dim=8,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=4,
    mlp_dim=12,
    max_len=32,
)


def real_param_count(cfg: ModelConfig) -> int:
    """Elements of every parameter leaf of the model, built abstractly (no memory)."""
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model)))


@pytest.mark.parametrize(
    "changes",
    [
        {},  # GQA, untied
        {"tie_embeddings": True},
        {"num_kv_heads": 4},  # multi-head
        {"num_kv_heads": 1},  # multi-query
        {"num_kv_heads": 1, "tie_embeddings": True, "num_layers": 3, "mlp_dim": 20},
        {"qkv_bias": True, "tie_embeddings": True},  # Qwen2's q/k/v biases
        {"qk_norm": True},  # Qwen3's q/k norms
        {"qk_norm": True, "sandwich_norms": True, "tie_embeddings": True},  # Gemma's 4 norms
    ],
    ids=["gqa", "tied", "mha", "mqa", "mqa-tied-3layers", "qkv-bias", "qk-norm", "gemma"],
)
def test_count_params_equals_the_built_model(changes):
    cfg = dataclasses.replace(HAND, **changes)
    assert count_params(cfg) == real_param_count(cfg)


@pytest.mark.parametrize("name", ["tiny", "small", "llama1b"])
def test_count_params_of_shipped_models(name):
    cfg = compose([f"model={name}"]).model
    assert count_params(cfg) == real_param_count(cfg)


def test_count_params_by_hand():
    # per layer: wq 8*4*4=128, wk 8*2*4=64, wv 64, wo 4*4*8=128,
    #            gate/up/down 3*8*12=288, two norms 2*8=16      -> 688
    # total: embed 16*8=128 + 2 layers * 688 + final norm 8 + lm_head 8*16=128 = 1640
    assert count_params(HAND) == 1640
    assert count_params(dataclasses.replace(HAND, tie_embeddings=True)) == 1640 - 128


def test_llama1b_has_1_104_218_112_parameters():
    assert count_params(compose(["+experiment=llama1b"]).model) == 1_104_218_112


def test_step_flops_by_hand():
    b, seq = 2, 5
    report = step_flops(HAND, batch_size=b, seq_len=seq, num_devices=1)
    # Weights in matmuls per token: per layer wq 128 + wk 64 + wv 64 + wo 128 + MLP 288 = 672,
    # two layers 1344, plus the output projection 8*16 = 128 -> 1472 (embedding lookup: 0).
    assert matmul_params(HAND) == 1472
    tokens = b * seq  # 10
    learnable = 3 * (2 * tokens * 1472)  # fwd + bwd = 3 x (2 FLOPs per multiply-add)
    assert learnable == 88_320
    # Attention forward per layer: QK^T and PV are 2 matmuls x 2 FLOPs x B x L^2 x H x D
    # = 2*2*2*25*4*4 = 3200, halved by the causal mask = 1600; 2 layers = 3200; x3 = 9600.
    attention = 3 * (2 * (2 * 2 * b * seq**2 * 4 * 4) // 2)
    assert attention == 9_600
    assert report.learnable_flops == learnable
    assert report.attention_flops == attention
    assert report.flops_per_step_per_device == 97_920
    assert report.tflops_per_step_per_device == pytest.approx(97_920 / 1e12)
    assert report.learnable_tflops == pytest.approx(88_320 / 1e12)
    assert report.attention_tflops == pytest.approx(9_600 / 1e12)
    assert report.learnable_fraction == pytest.approx(88_320 / 97_920)
    assert report.tokens_per_step == 10
    assert report.num_params == 1640


@pytest.mark.parametrize("window", [1, 5, 15, 16, 40])
def test_a_sliding_window_counts_the_window_not_the_sequence(window):
    """The pairs the window mask keeps, counted off the mask itself (diagonal half, as the
    causal count halves); a window as long as the sequence is plain causal."""
    cfg, b, seq = dataclasses.replace(HAND, sliding_window=window), 3, 16
    ones = np.ones((seq, seq))
    pairs = np.tril(np.triu(ones, 1 - window)).sum() - seq / 2
    expected = 3 * 2 * 2 * b * pairs * cfg.num_heads * cfg.head_dim * cfg.num_layers
    assert step_flops(cfg, b, seq).attention_flops == pytest.approx(expected, rel=1e-12)


def test_a_mixed_stack_counts_the_window_in_its_sliding_layers_only():
    """Gemma 3's pattern over 7 layers with global_every 3: layers 3 and 6 see all keys."""
    cfg, b, seq = dataclasses.replace(HAND, num_layers=7, sliding_window=4, global_every=3), 2, 16
    ones = np.ones((seq, seq))
    local = np.tril(np.triu(ones, 1 - 4)).sum() - seq / 2
    full = np.tril(ones).sum() - seq / 2
    pairs = sum(full if (i + 1) % 3 == 0 else local for i in range(7))
    expected = 3 * 2 * 2 * b * pairs * cfg.num_heads * cfg.head_dim
    assert step_flops(cfg, b, seq).attention_flops == pytest.approx(expected, rel=1e-12)


def test_attention_flops_are_halved_for_the_causal_mask():
    cfg, b, seq = HAND, 3, 16
    full = 3 * 2 * 2 * b * seq**2 * cfg.num_heads * cfg.head_dim * cfg.num_layers  # no mask
    assert step_flops(cfg, b, seq).attention_flops == full / 2


def test_tied_output_projection_still_counts_as_a_matmul():
    tied = step_flops(dataclasses.replace(HAND, tie_embeddings=True), 2, 5)
    untied = step_flops(HAND, 2, 5)
    assert tied.learnable_flops == untied.learnable_flops
    assert tied.num_params == untied.num_params - 128


def test_gqa_does_not_change_attention_flops():
    """Scores and values are computed per query head, however many kv heads there are."""
    mha = step_flops(dataclasses.replace(HAND, num_kv_heads=4), 2, 5)
    assert step_flops(HAND, 2, 5).attention_flops == mha.attention_flops


@pytest.mark.parametrize("devices", [2, 4, 8])
def test_per_device_numbers_divide_by_the_device_count(devices):
    one = step_flops(HAND, 8, 16, num_devices=1)
    many = step_flops(HAND, 8, 16, num_devices=devices)
    assert many.learnable_flops == one.learnable_flops  # whole-batch totals unchanged
    assert many.flops_per_step_per_device == pytest.approx(one.flops_per_step_per_device / devices)
    assert many.tflops_per_step_per_device == pytest.approx(
        one.tflops_per_step_per_device / devices
    )
    assert many.learnable_tflops == pytest.approx(one.learnable_tflops / devices)
    assert many.attention_tflops == pytest.approx(one.attention_tflops / devices)
    assert many.learnable_fraction == pytest.approx(one.learnable_fraction)
    d = many.as_dict()
    assert d["num_devices"] == devices
    assert d["tflops_per_step_per_device"] == pytest.approx(
        d["learnable_tflops"] + d["attention_tflops"]
    )


def test_summary_mentions_the_count_and_split():
    text = step_flops(HAND, 2, 5).summary()
    assert "1,640" in text
    assert f"{100 * 88_320 / 97_920:.2f}% learnable" in text
