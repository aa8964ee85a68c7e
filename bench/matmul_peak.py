"""This machine's float32 matmul peak, the denominator of the CPU MFU, measured in fresh
processes.

The peak must be the machine's best, not the best of the layout a run happens to use: in
a process with 2 CPU devices one device's matmul runs on that device's threads only, and
reached 216 GFLOP/s where JAX's default single CPU device (every core's threads) reached
279-353 GFLOP/s on the same machine kind. So each layout is measured in its own process
(JAX's default device, and N devices with device 0 alone and every device at once), and
the MFU divides by the best of all of them.

    python -m bench.matmul_peak [--devices 2] [--n 1024]   # one process, prints JSON
"""

import argparse
import json
import subprocess
import sys
import time

DEFAULT_LAYOUTS = (0, 2)  # 0: JAX's default (one CPU device using every core)


def measure(n: int = 1024, reps: int = 20, tries: int = 5) -> dict[str, float]:
    """Best FLOP/s of `tries` timings of `reps` jitted n x n float32 matmuls in this process:
    on device 0 alone (`one`) and, with several devices, on every device at once (`all`)."""
    import jax
    import jax.numpy as jnp

    f = jax.jit(lambda x: x @ x)
    layouts = {"one": [jax.devices()[0]]}
    if jax.device_count() > 1:
        layouts["all"] = jax.devices()
    result = {}
    for name, devices in layouts.items():
        arrays = [jax.device_put(jnp.ones((n, n), jnp.float32), d) for d in devices]
        jax.block_until_ready([f(a) for a in arrays])
        best = 0.0
        for _ in range(tries):
            t0 = time.perf_counter()
            out = [f(a) for _ in range(reps) for a in arrays]
            jax.block_until_ready(out)
            best = max(best, len(out) * 2 * n**3 / (time.perf_counter() - t0))
        result[name] = best
    return result


def peak_flops(
    layouts: tuple[int, ...] = DEFAULT_LAYOUTS, n: int = 1024
) -> dict[tuple[int, str], float]:
    """{(CPU device count (0: JAX's default), "one" or "all"): best matmul FLOP/s}, each
    device count measured in a fresh process."""
    result = {}
    for devices in layouts:
        proc = subprocess.run(
            [sys.executable, "-m", "bench.matmul_peak", f"--devices={devices}", f"--n={n}"],
            capture_output=True,
            text=True,
            check=True,
        )
        report = json.loads(proc.stdout.strip().splitlines()[-1])
        for name, flops in report["flops"].items():
            result[(devices, name)] = float(flops)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=0, help="CPU devices; 0: JAX's default")
    parser.add_argument("--n", type=int, default=1024)
    args = parser.parse_args()
    import jax

    if args.devices:
        jax.config.update("jax_num_cpu_devices", args.devices)
    flops = measure(args.n)
    print(json.dumps({"devices": jax.device_count(), "flops": flops}))


if __name__ == "__main__":
    main()
