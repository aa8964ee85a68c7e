"""The families beyond Llama (issue 26), each against transformers on one tiny random model
built from its config class: odd vocabulary, grouped-query attention, random norm scales
(q/k norms included) and biases, several safetensors shards. Checks float32 logits within
1e-4, greedy generation token for token on prompts of different lengths, HF -> nnxtrain ->
HF bitwise with a config.json transformers reads as the same model, the parameter count,
and a one-line refusal of what a family's decoder does not run.

Run with `-s` to see the max abs diff of each family (the closing note's parity figures).
"""

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import rounding_tolerance
from flax import nnx
from hf_models import (
    BASE,
    CLASSES,
    MOE_FAMILIES,
    TOLERANCE,
    WINDOW,
    hf_model,
    make_hf,
    tensors,
    tokens,
)
from hf_models import (
    FAMILIES as DENSE_FAMILIES,
)

import nnxtrain.interop.hf as hf
from nnxtrain import compose, generate
from nnxtrain.errors import UserError
from nnxtrain.interop.hf.config import from_model_config, to_model_config
from nnxtrain.model import Transformer
from nnxtrain.model.moe import aux_losses
from nnxtrain.train.accounting import count_params
from nnxtrain.train.loss import batch_loss_sums, summarize

VOCAB = 131  # odd: no vocabulary-sized dimension lines up with another by chance
# every family: the dense ones (also run on meshes by test_hf_meshes) and the experts'
FAMILIES = DENSE_FAMILIES | MOE_FAMILIES
SWITCHES = {
    "mistral": (),
    "qwen2": ("qkv_bias",),
    "qwen3": ("qk_norm",),
    "gemma3_text": ("qk_norm",),
    "gemma2": (),
    "mixtral": (),
    "qwen3_moe": ("qk_norm",),
}


# compiled: eager dispatch of an MoE's many small ops is slower than one compile
forward = nnx.jit(lambda model, tokens: model(tokens))


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, Path]:
    """One saved random model per family, in several shards, no end-of-sequence token."""
    root = tmp_path_factory.mktemp("families")
    return {
        kind: make_hf(
            root / kind,
            kind=kind,
            vocab_size=VOCAB,
            max_shard_size="40KB",
            bos_token_id=None,
            eos_token_id=None,
            **kw,
        )
        for kind, kw in FAMILIES.items()
    }


@pytest.mark.parametrize("kind", sorted(FAMILIES))
def test_logits_and_parameter_count_equal_transformers(hf_dirs, kind):
    path = hf_dirs[kind]
    assert len(list(path.glob("*.safetensors"))) > 1
    model = hf.load(str(path), param_dtype="float32")
    assert [s for s in ("qkv_bias", "qk_norm") if getattr(model.cfg, s)] == list(SWITCHES[kind])
    theirs, _ = hf_model(path)
    toks = tokens(40, vocab=VOCAB)
    with torch.no_grad():
        reference = theirs(torch.tensor(toks, dtype=torch.long)).logits.numpy()
    diff = float(np.max(np.abs(np.asarray(forward(model, jnp.asarray(toks))) - reference)))
    print(f"parity {kind} logits: max abs diff {diff:.2e}")
    assert diff <= TOLERANCE
    assert count_params(model.cfg) == theirs.num_parameters()
    assert model.cfg.sliding_window == (
        WINDOW if kind in ("mistral", "gemma3_text", "gemma2", "mixtral") else 0
    )


# mixtral's decode path is qwen3_moe's (experts, and dense layers between) with mistral's
# window: both covered
@pytest.mark.parametrize("kind", sorted(set(FAMILIES) - {"mixtral"}))
def test_greedy_generation_equals_transformers(hf_dirs, kind):
    """nnxtrain generates the batch at once, right-padded; transformers row by row (see
    tests/integration/test_generate_hf.py)."""
    path, new = hf_dirs[kind], 16  # past the window: prompts of up to 11, 16 new tokens
    theirs, _ = hf_model(path)
    ours = hf.load(str(path))
    lengths = np.array([5, 11, 2])
    prompts = np.random.default_rng(1).integers(0, VOCAB, (3, 11)).astype(np.int32)
    got = np.asarray(generate(ours, prompts, max_new_tokens=new, prompt_lengths=lengths))
    gen = transformers.GenerationConfig(max_new_tokens=new, do_sample=False, pad_token_id=0)
    for row, n in enumerate(lengths):
        ids = torch.tensor(prompts[row : row + 1, :n], dtype=torch.long)
        with torch.no_grad():
            out = theirs.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen)
        np.testing.assert_array_equal(got[row], out[0, n:].numpy(), err_msg=f"{kind} row {row}")


@pytest.mark.parametrize("kind", sorted(FAMILIES))
def test_round_trip_is_bitwise_and_loads_as_the_same_family(hf_dirs, tmp_path, kind):
    src = hf_dirs[kind]
    hf.save(hf.load(str(src)), str(tmp_path), max_shard_bytes=40_000)
    before, after = tensors(src), tensors(tmp_path)
    assert sorted(before) == sorted(after)
    for name, t in before.items():
        assert after[name].dtype == t.dtype and after[name].shape == t.shape, name
        assert after[name].tobytes() == t.tobytes(), name
    written = json.loads((tmp_path / "config.json").read_text())
    original = json.loads((src / "config.json").read_text())
    assert written["model_type"] == kind and written["architectures"] == original["architectures"]
    (a, _), (b, info) = hf_model(src), hf_model(tmp_path)
    assert all(not v for v in info.values()), info  # nothing missing, unexpected, mismatched
    keys = ("head_dim", "num_key_value_heads", "tie_word_embeddings", "rope_parameters")
    for key in (*keys, "sliding_window", "layer_types"):
        assert getattr(a, key, None) == getattr(b, key, None), key


# Qwen3-MoE only: both families' load-balancing loss is transformers' one function of the
# router logits, and ours one function too (Mixtral's logits are checked above); 9 s saved.
@pytest.mark.parametrize("kind", ["qwen3_moe"])
def test_moe_aux_loss_equals_transformers(hf_dirs, kind):
    """The load-balancing loss of `output_router_logits=True` with an attention mask (right
    padding: HF leaves the masked tokens out, nnxtrain's segment id 0 does), and over all
    tokens in the training loss, which adds router_aux_loss_coef times it."""
    path = hf_dirs[kind]
    model = hf.load(str(path), param_dtype="float32")
    theirs, _ = hf_model(path)
    toks = tokens(40, vocab=VOCAB)
    mask = np.ones_like(toks)
    mask[1, 25:] = 0
    with torch.no_grad():
        out = theirs(
            torch.tensor(toks, dtype=torch.long),
            attention_mask=torch.tensor(mask),
            output_router_logits=True,
        )
    routed = nnx.jit(lambda m, t, s: m.routed_hidden(t, segment_ids=s)[1])
    stats = routed(model, jnp.asarray(toks), jnp.asarray(mask))
    ours = float(aux_losses(stats, model.cfg.moe.experts)["aux"])
    print(f"parity {kind} aux loss (masked): {ours} vs {float(out.aux_loss)}")
    # float32 sums over 2 layers x 80 tokens x 8 experts, added in other orders
    np.testing.assert_allclose(ours, float(out.aux_loss), rtol=rounding_tolerance(1280))
    assert model.cfg.moe.aux_loss_coef == theirs.config.router_aux_loss_coef
    # The training loss: cross-entropy plus coef x aux, as transformers' loss with labels
    # (a coefficient large enough to show). HF shifts labels itself: its last position
    # has no target, so ours gets weight 0 there.
    coef = 0.5
    theirs.config.router_aux_loss_coef = theirs.router_aux_loss_coef = coef
    model.cfg = dataclasses.replace(
        model.cfg, moe=dataclasses.replace(model.cfg.moe, aux_loss_coef=coef)
    )
    weights = np.ones(toks[:, 1:].shape, np.float32)
    weights[:, -1] = 0
    batch = {"inputs": toks[:, :-1], "targets": toks[:, 1:], "weights": weights}
    loss = nnx.jit(lambda m, b: summarize(batch_loss_sums(m, b, 0.0)))
    ours = loss(model, jax.tree.map(jnp.asarray, batch))
    with torch.no_grad():
        ids = torch.tensor(toks[:, :-1], dtype=torch.long)
        out = theirs(ids, labels=ids, output_router_logits=True)
    print(f"parity {kind} loss with aux: {float(ours['loss'])} vs {float(out.loss)}")
    np.testing.assert_allclose(float(ours["loss"]), float(out.loss), rtol=1e-5)
    np.testing.assert_allclose(float(ours["moe_aux_loss"]), float(out.aux_loss), rtol=1e-5)


# config.json -> the key the one-line refusal names
REFUSED = {
    "qwen3 attention_bias": ({"model_type": "qwen3", "attention_bias": True}, "attention_bias"),
    "qwen2 use_sliding_window": (
        {"model_type": "qwen2", "use_sliding_window": True},
        "sliding_window",
    ),
    "qwen2_moe": ({"model_type": "qwen2_moe"}, "model_type"),
    "gemma3 irregular layer_types": (
        {"model_type": "gemma3_text", "layer_types": ["full_attention", "sliding_attention"]},
        "layer_types",
    ),
    "gemma3 layer_types not a list": (
        {"model_type": "gemma3_text", "layer_types": 5},
        "layer_types",
    ),
    "gemma3 bidirectional": (
        {"model_type": "gemma3_text", "use_bidirectional_attention": True},
        "use_bidirectional_attention",
    ),
    "gemma3 activation": (
        {"model_type": "gemma3_text", "hidden_activation": "silu"},
        "hidden_activation",
    ),
    "gemma3 query_pre_attn_scalar": (
        {"model_type": "gemma3_text", "query_pre_attn_scalar": 0},
        "query_pre_attn_scalar",
    ),
    "deepseek_v3": ({"model_type": "deepseek_v3", "n_routed_experts": 8}, "model_type"),
    "qwen3_moe dense layer past the last": (
        {
            "model_type": "qwen3_moe",
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "mlp_only_layers": [0, 2],
        },
        "mlp_only_layers",
    ),
    "qwen3_moe no sparse layer left": (
        {
            "model_type": "qwen3_moe",
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "mlp_only_layers": [0, 1],
        },
        "mlp_only_layers",
    ),
    "qwen3_moe sparse step 0": (
        {
            "model_type": "qwen3_moe",
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "decoder_sparse_step": 0,
        },
        "decoder_sparse_step",
    ),
    "mixtral jitter": (
        {"model_type": "mixtral", "router_jitter_noise": 0.1},
        "router_jitter_noise",
    ),
    "mixtral top_k": ({"model_type": "mixtral", "num_experts_per_tok": 9}, "num_experts_per_tok"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_what_a_family_does_not_run_is_one_line_naming_the_key(case):
    extra, key = REFUSED[case]
    with pytest.raises(UserError) as err:
        to_model_config({**BASE, **extra}, "m", param_dtype="float32")
    line = str(err.value)
    print(f"refused {case}: {line}")
    assert "\n" not in line and f"config.json key '{key}'" in line, line


def test_qwen2_sliding_window_without_use_sliding_window_is_off():
    """Qwen's sliding_window (default 4096) means nothing unless use_sliding_window."""
    for extra in ({}, {"sliding_window": 64}, {"use_sliding_window": False, "sliding_window": 64}):
        hf_cfg = {**BASE, "model_type": "qwen2", **extra}
        cfg = to_model_config(hf_cfg, "m", param_dtype="float32")
        assert cfg.qkv_bias and transformers.Qwen2Config(**BASE, **extra).sliding_window is None


SHIPPED = {
    "qwen3_0.6b": "qwen3",
    "qwen2.5_0.5b": "qwen2",
    "mistral_7b": "mistral",
    "gemma3_1b": "gemma3_text",
    "qwen3_30b_a3b": "qwen3_moe",
    "mixtral_8x7b": "mixtral",
}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_model_counts_as_transformers_counts_its_export(name):
    """model=<name> exports as its family, and transformers' model of that config.json
    (built on the meta device: shapes, no memory) has count_params' parameters."""
    cfg = compose([f"model={name}"]).model
    config = from_model_config(cfg, dtype="bfloat16")
    assert config["model_type"] == SHIPPED[name]
    config_cls, model_cls = CLASSES[config["model_type"]]
    with torch.device("meta"):
        theirs = model_cls(config_cls(**config))
    assert count_params(cfg) == theirs.num_parameters()


@pytest.mark.parametrize(
    "switches",
    [{"qkv_bias": True, "qk_norm": True}, {"qk_norm": True, "sliding_window": 16}],
    ids=["bias-and-qk-norm", "qk-norm-and-window"],
)
def test_switches_no_family_combines_are_one_line_at_export(tmp_path, switches):
    """hf.save refuses before it writes anything."""
    cfg = dataclasses.replace(compose(["model=tiny"]).model, dtype="float32", **switches)
    with pytest.raises(UserError) as err:
        # abstract (nothing allocated): a save that got past the check would fail otherwise
        hf.save(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))), str(tmp_path / "out"))
    line = str(err.value)
    assert "\n" not in line and all(f"model.{s}" in line for s in switches), line
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
