#!/usr/bin/env bash
# GPU benchmark: llama1b for 30 steps on one H100/H200 with the best known settings, then
# tokens/s/device, TFLOP/s/device and MFU against the chip's dense bf16 peak.
#
#   bash bench/gpu.sh [extra nnxtrain overrides ...]
#
# Needs JAX (CUDA), Flax, Optax, Orbax and rich on the machine. hydra-core, omegaconf (and
# antlr4-python3-runtime) may come as wheels in .whl/ (see docs/performance.md); nnxtrain
# itself is not installed: it is laid out in a temporary folder and put on PYTHONPATH.
# Finishes in well under 8 minutes (start-up, ~1 min compile, 30 steps).
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$work/site" .whl/*.whl
fi
# The installed layout: conf/ and plugins/ become nnxtrain.conf and nnxtrain.plugins.
mkdir -p "$work/pkg"
cp -r nnxtrain "$work/pkg/nnxtrain"
cp -r conf "$work/pkg/nnxtrain/conf"
cp -r plugins "$work/pkg/nnxtrain/plugins"
cp -r bench "$work/pkg/bench"
export PYTHONPATH="$work/pkg:$work/site${PYTHONPATH:+:$PYTHONPATH}"
run_dir="${OUT:-$work}/llama1b_gpu"
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
python3 -m nnxtrain.cli +experiment=llama1b \
  model.dtype=bfloat16 model.attention=cudnn model.remat=dots_no_batch \
  run.batch_size=8 run.steps=30 run.log_every=5 run.eval_every=0 \
  ~callbacks.checkpoint run.compile_cache="$work/jax_cache" \
  run.dir="$run_dir" hydra.run.dir="$run_dir" "$@"
python3 -m bench.gpu_report "$run_dir"
