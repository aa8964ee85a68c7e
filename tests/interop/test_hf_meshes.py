"""hf.load places each tensor straight into its shards: on 8 simulated devices (fsdp=8, and
fsdp=2 x tensor=2 x data=2) the parameters are split by the logical-axis rules and the
logits still equal transformers' within 1e-4 (a subprocess, so JAX starts with 8 devices).
The same model with a PEFT LoRA adapter on it gives PEFT's logits on both meshes, each
adapter split like the weight it adapts (issue 25). Every family of issue 26 (q/k/v biases,
q/k norms, sliding windows, Gemma's mixed stacks) gives transformers' logits on both meshes
too, in the same subprocess. A Qwen3-MoE (8 experts, top 2, a dense layer between two
sparse ones) on expert=4 x fsdp=2 gives transformers' logits, and the logits and gradients
of the training loss it has on one device (issue 28)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import cli_env, xla_flags
from hf_models import FAMILIES, LLAMA3, TOLERANCE, hf_logits, make_hf, tokens

CHILD = Path(__file__).with_name("hf_mesh_child.py")


@pytest.mark.slow  # a subprocess of 8 devices: scheduled first (tests/conftest.py)
def test_parity_on_meshes_of_8_devices(tmp_path):
    # 128-wide MLP and 2 kv heads: every dimension a rule splits divides its mesh axes.
    path = make_hf(tmp_path / "hf", intermediate_size=128, rope_parameters=LLAMA3)
    toks = tokens(80, batch=8)
    np.save(tmp_path / "tokens.npy", toks)
    np.save(tmp_path / "logits.npy", hf_logits(path, toks))
    np.save(tmp_path / "peft.npy", peft_logits(path, tmp_path / "adapter", toks))
    env = cli_env()
    env["XLA_FLAGS"] = xla_flags(8)
    files = [str(path), str(tmp_path / "tokens.npy"), str(tmp_path / "logits.npy")]
    files.append(f"adapter={tmp_path / 'adapter'}:{tmp_path / 'peft.npy'}")
    for kind, overrides in FAMILIES.items():  # 80 tokens: past every window of 8
        family = make_hf(tmp_path / kind, kind=kind, intermediate_size=128, **overrides)
        np.save(tmp_path / f"{kind}.npy", hf_logits(family, toks))
        files.append(f"family={kind}:{family}:{tmp_path / kind}.npy")
    files.append(moe_case(tmp_path))
    out = subprocess.run(
        [sys.executable, str(CHILD), *files, "1,8,1", "2,2,2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    moe = report.pop("moe")
    print(f"parity MoE expert=4 x fsdp=2: {moe}")
    assert moe["max_abs_diff"] <= TOLERANCE
    # one device against 8: the same float32 math summed in other orders, a few ulps of
    # the logits and gradients apart: within the 1e-5
    assert moe["one_device_diff"] <= 1e-5 and moe["grad_diff"] <= 1e-5
    # w_gate [sparse layers 2, experts 8, embed 64, mlp 32]: experts over expert, embed over
    # fsdp
    assert moe["w_gate_spec"] == "P(None, 'expert', 'fsdp', 'tensor')"
    assert moe["w_gate_shard"] == [2, 2, 32, 32] and moe["all_to_all"] > 0
    for shape, r in report.items():
        print(f"parity mesh data,fsdp,tensor={shape}: max abs diff {r['max_abs_diff']:.2e}")
        assert r["max_abs_diff"] <= TOLERANCE and r["devices"] == 8
        print(f"parity LoRA mesh {shape}: max abs diff {r['lora']['max_abs_diff']:.2e}")
        assert r["lora"]["max_abs_diff"] <= TOLERANCE
        assert sorted(r["families"]) == sorted(FAMILIES)
        for kind, diff in r["families"].items():
            print(f"parity {kind} mesh {shape}: max abs diff {diff:.2e}")
            assert diff <= TOLERANCE, kind
    # wq [layers, embed 64, q_heads 4, kv 16]: embed over fsdp, q_heads over tensor.
    fsdp8, mixed = report["1,8,1"], report["2,2,2"]
    assert fsdp8["wq_shard"] == [2, 8, 4, 16] and fsdp8["embed_shard"] == [128, 8]
    assert mixed["wq_shard"] == [2, 32, 2, 16] and mixed["embed_shard"] == [64, 32]
    # q_proj's A [layers, embed, r] splits embed as wq does; B [layers, r, q_heads, kv] q_heads.
    assert fsdp8["lora"]["q_a_shard"] == [2, 8, 4] and fsdp8["lora"]["q_b_shard"] == [2, 4, 4, 16]
    assert mixed["lora"]["q_a_shard"] == [2, 32, 4] and mixed["lora"]["q_b_shard"] == [2, 4, 2, 16]


def moe_case(tmp_path: Path) -> str:
    """A Qwen3-MoE of 8 experts (top 2, 32 features each) with a dense layer between two
    sparse ones (two stacks, each scanned in slices), its tokens and transformers' logits
    saved: the child's `moe=` argument."""
    path = make_hf(
        tmp_path / "moe",
        kind="qwen3_moe",
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        mlp_only_layers=[1],
    )
    toks = tokens(24, batch=8)
    np.save(tmp_path / "moe_tokens.npy", toks)
    np.save(tmp_path / "moe_logits.npy", hf_logits(path, toks))
    return f"moe={path}:{tmp_path / 'moe_tokens.npy'}:{tmp_path / 'moe_logits.npy'}"


def peft_logits(base: Path, out: Path, toks: np.ndarray) -> np.ndarray:
    """Writes a PEFT adapter (random B, every linear, r=4, alpha 6) of `base` to `out`;
    PEFT's logits of `toks` with it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(1)
    hf = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = get_peft_model(hf, LoraConfig(r=4, lora_alpha=6.0, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)
        model.save_pretrained(out)
        return model(torch.tensor(toks, dtype=torch.long)).logits.numpy()
