"""What `auto` means on each platform: `resolve_auto` turns a model config's
`attention=auto`, `dtype=auto`, `moe.impl=auto` and `scan_layers=null` into the concrete
kernel, activation dtype, experts' grouped matmul and layer loop for the platform a run
targets.

The model alone only knows JAX's default backend, which is not the target when a CPU host
compiles for TPUs ahead of time; the trainer knows its devices and resolves the config
with their platform before it builds the model. A config still holding `auto` keeps the
model's own default (`Attention`, `activation_dtype`).
"""

import dataclasses

from nnxtrain.config import ModelConfig

# platform -> (attention kernel, activation dtype) that `auto` stands for there.
AUTO_CHOICES: dict[str, tuple[str, str]] = {
    # the Pallas flash kernel: the [length, length] scores never sit in HBM
    "tpu": ("splash", "bfloat16"),
    # cuDNN's flash attention ("gpu" is JAX's name for NVIDIA and AMD devices alike;
    # pass "rocm" for AMD, where cuDNN does not exist)
    "gpu": ("cudnn", "bfloat16"),
    "cuda": ("cudnn", "bfloat16"),
    "rocm": ("xla", "bfloat16"),
    # batched matmuls and float32 are the fastest on CPU (docs/performance.md)
    "cpu": ("matmul", "float32"),
}

# cuDNN's flash attention takes half-precision inputs only.
CUDNN_DTYPES = ("bfloat16", "float16")


def resolve_auto(cfg: ModelConfig, platform: str) -> ModelConfig:
    """`cfg` with `attention=auto` and `dtype=auto` replaced by `platform`'s choices
    (`AUTO_CHOICES`; a platform name as `jax.Device.platform` gives it), and
    `scan_layers=null` by a scan everywhere but on CPU (one compiled layer body; CPU runs
    small models faster unrolled); concrete values are kept. Where the dtype is set to
    float32 by hand, GPU's auto kernel is `xla`."""
    if platform not in AUTO_CHOICES:
        raise ValueError(f"no auto choices for platform {platform!r}: one of {list(AUTO_CHOICES)}")
    attention, dtype = AUTO_CHOICES[platform]
    dtype = dtype if cfg.dtype == "auto" else cfg.dtype
    if attention == "cudnn" and dtype not in CUDNN_DTYPES:
        attention = "xla"
    attention = attention if cfg.attention == "auto" else cfg.attention
    scan = cfg.scan_layers if cfg.scan_layers is not None else platform != "cpu"
    moe = cfg.moe
    if moe.experts and moe.impl == "auto":  # JAX's ragged_dot on CPU: dense, per expert
        moe = dataclasses.replace(moe, impl="blocks" if platform == "cpu" else "ragged")
    return dataclasses.replace(cfg, attention=attention, dtype=dtype, scan_layers=scan, moe=moe)
