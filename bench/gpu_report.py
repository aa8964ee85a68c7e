"""Reads a GPU run's metrics.jsonl and prints tokens/s/device, TFLOP/s/device and MFU.

    python -m bench.gpu_report RUN_DIR

MFU is the model TFLOP/s per device (the accounting's FLOPs: learnable weights plus
causal attention, backward = 2x forward, remat not counted) over the chip's dense bf16
peak. The first logged window (compile warm-up, first step) is left out of the medians.
"""

import json
import statistics
import sys
from pathlib import Path

import jax

# Dense (no sparsity) bf16 tensor-core peak per chip, TFLOP/s, from NVIDIA's data sheets.
PEAK_BF16_TFLOPS = {
    "H100 80GB HBM3": 989.0,
    "H100 SXM": 989.0,
    "H100 PCIe": 756.0,
    "H200": 989.0,
    "A100": 312.0,
}


def chip_peak(kind: str) -> float:
    for name, peak in PEAK_BF16_TFLOPS.items():
        if name.lower() in kind.lower():
            return peak
    if "h100" in kind.lower():
        return 989.0
    raise SystemExit(f"unknown chip {kind!r}: add its dense bf16 peak to PEAK_BF16_TFLOPS")


def main() -> None:
    run_dir = Path(sys.argv[1])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "tflops_per_sec_per_device" in r][1:]
    if not steps:
        raise SystemExit("no logged steps after the first window: run more steps")
    tflops = statistics.median(r["tflops_per_sec_per_device"] for r in steps)
    tokens = statistics.median(r["tokens_per_sec_per_device"] for r in steps)
    kind = jax.devices()[0].device_kind
    peak = chip_peak(kind)
    info = json.loads((run_dir / "run_info.json").read_text())
    print(f"\nchip: {kind} ({jax.device_count()} device(s)), dense bf16 peak {peak:.0f} TFLOP/s")
    print(
        f"model: {info['model']}, {info['num_params']:,} parameters, batch "
        f"{info['batch_size']} x {info['seq_len']}, {info['tflops_per_step_per_device']:.2f} "
        "TFLOPs per step per device"
    )
    print(
        f"median over {len(steps)} logged windows: {tokens:,.0f} tokens/s/device, "
        f"{tflops:.1f} TFLOP/s/device, MFU {tflops / peak:.1%} (target >= 50%)"
    )


if __name__ == "__main__":
    main()
