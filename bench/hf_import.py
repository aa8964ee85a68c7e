"""Importing a Hugging Face checkpoint: the time of `nnxtrain.interop.hf.load` and its peak memory.

Writes a random checkpoint of the llama1b shape (conf/model/llama1b.yaml: 16 layers, 2048
wide, vocab 32000, untied; about 2.2 GB of bfloat16 safetensors, one file as transformers
writes it) to a temporary directory, then loads it in a fresh subprocess per case and
reports the load's seconds and its peak RSS growth (ru_maxrss after the load minus
ru_maxrss once JAX and nnxtrain are imported and a device exists) relative to the
checkpoint's size, and its CPU seconds (steadier than wall time on a shared machine).
Goal: <= 1.5x when the weights are kept in their stored dtype. Loading bfloat16 as
float32 holds twice the bytes by necessity; that case is informational.

    python bench/hf_import.py [--keep DIR]
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

MODEL = {  # conf/model/llama1b.yaml
    "vocab_size": 32000,
    "emb_dim": 2048,
    "num_layers": 16,
    "num_heads": 16,
    "num_kv_heads": 16,
    "head_dim": 128,
    "mlp_dim": 7168,
    "max_len": 2048,
}


def write_checkpoint(path: str) -> int:
    """A random llama1b-shaped bf16 HF directory at `path`; returns the weights' bytes."""
    import jax.numpy as jnp
    from flax import nnx

    from nnxtrain.config import ModelConfig
    from nnxtrain.interop.hf.config import from_model_config
    from nnxtrain.interop.hf.weights import hf_names, hf_shape, weights_of, write_shards
    from nnxtrain.model import Transformer

    cfg = ModelConfig(name="llama1b", param_dtype="bfloat16", **MODEL)
    abstract = dict(
        nnx.to_flat_state(nnx.state(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))))
    )
    bf16 = np.dtype(jnp.bfloat16)
    rng = np.random.default_rng(0)
    items = []
    for w in weights_of(cfg):
        shape = abstract[w.path].get_value().shape
        one = hf_shape(w, shape[1:] if w.per_layer else shape)
        for name in hf_names(w, cfg):
            items.append(
                (name, one, bf16, lambda s=one: rng.standard_normal(s, np.float32).astype(bf16))
            )
    os.makedirs(path, exist_ok=True)
    write_shards(path, items, 5 * 10**9)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(from_model_config(cfg, dtype="bfloat16"), f)
    return sum(
        os.path.getsize(os.path.join(path, n))
        for n in os.listdir(path)
        if n.endswith(".safetensors")
    )


def _cpu_seconds() -> float:
    """User + system CPU time of this process: on a shared machine, steadier than wall time."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def child(path: str, param_dtype: str | None) -> None:
    """Loads `path` once and prints {seconds, peak_growth_bytes} as JSON."""
    import jax

    import nnxtrain.interop.hf as hf

    jax.device_put(np.zeros(4)).block_until_ready()  # the runtime exists before the baseline
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    t0, c0 = time.perf_counter(), _cpu_seconds()
    model = hf.load(path, param_dtype=param_dtype)
    jax.block_until_ready(jax.tree.leaves(model))
    seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(
        json.dumps(
            {
                "seconds": seconds,
                "cpu_seconds": cpu,
                "peak_growth_bytes": peak - base,
                "baseline_bytes": base,
            }
        )
    )


def _python(*args: str) -> str:
    """The last line this script prints when run with `args` in a fresh process.

    Linux carries ru_maxrss across fork and exec, so a child started by a large process
    would start from the parent's peak: this parent stays small (it writes the checkpoint
    in a child too), and each child's baseline, taken after its imports, is its own."""
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    out = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, env=env, check=True
    )
    return out.stdout.strip().splitlines()[-1]


def measure(path: str, param_dtype: str | None) -> dict[str, float]:
    return json.loads(
        _python("--child", path, *(["--param-dtype", param_dtype] if param_dtype else []))
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", help="write the checkpoint here and keep it")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--param-dtype", help=argparse.SUPPRESS)
    parser.add_argument("--write", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.param_dtype)
        return
    if args.write:
        print(write_checkpoint(args.write))
        return
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with tempfile.TemporaryDirectory(prefix="nnxtrain-hf-import-") as tmp:
        path = args.keep or os.path.join(tmp, "llama1b")
        t0 = time.perf_counter()
        size = int(_python("--write", path))
        print(f"wrote {size / 1e9:.2f} GB of bf16 safetensors in {time.perf_counter() - t0:.1f} s")
        for label, dtype in (("as stored (bfloat16)", None), ("as float32", "float32")):
            r = measure(path, dtype)
            ratio = r["peak_growth_bytes"] / size
            print(
                f"hf.load {label}: {r['seconds']:.1f} s ({r['cpu_seconds']:.1f} s CPU), "
                f"peak RSS growth {r['peak_growth_bytes'] / 1e9:.2f} GB = {ratio:.2f}x "
                f"the checkpoint" + (" (goal <= 1.5x)" if dtype is None else "")
            )
            assert r["baseline_bytes"] > own, "the baseline is the parent's peak: see _python"


if __name__ == "__main__":
    main()
