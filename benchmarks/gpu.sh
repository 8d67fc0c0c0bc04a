#!/usr/bin/env bash
# The GPU table in one command: SD 1.5 at 512 x 512, 50 steps, guidance, batch 1/4/8; jaxsd
# bfloat16 vs diffusers float16 (SDPA) and diffusers + torch.compile; cold and warm; images/s,
# UNet it/s, peak memory (benchmarks/gpu.py). Extra arguments go to gpu.py.
#
# The GPU machine we borrow has jax[cuda], torch, flax, transformers and safetensors but neither
# diffusers nor a network, so diffusers travels as a wheel, fetched beforehand where there is one:
#   pip download diffusers==0.42.1 --no-deps -d benchmarks/wheels
# (benchmarks/wheels/ is git-ignored: carry it along). Results: stdout, and $OUT/gpu_results.json
# ($OUT, or the current folder). Time limit: 470 s, rows printed as they are measured.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import diffusers" 2>/dev/null; then
  wheel=$(ls benchmarks/wheels/diffusers-*.whl 2>/dev/null | head -n 1 || true)
  if [ -z "$wheel" ]; then
    echo "gpu.sh: diffusers is not installed and benchmarks/wheels/ has no wheel;" \
         "run: pip download diffusers==0.42.1 --no-deps -d benchmarks/wheels" >&2
    exit 2
  fi
  pip install --quiet --no-deps --no-index "$wheel"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # jaxsd from this checkout, no install needed
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
python -c "import jax, torch; print('jax', jax.__version__, jax.devices(), '| torch', torch.__version__)"
timeout 470 python benchmarks/gpu.py --json "${OUT:-.}/gpu_results.json" "$@"
