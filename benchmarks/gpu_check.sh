#!/usr/bin/env bash
# GPU check: on a machine with CUDA, run the tiny-config tests on the GPU and time each
# method on all-MiniLM-L6-v2 in bf16 (benchmarks/gpu_timing.py, which writes
# benchmarks/results/gpu_timing.json). Without CUDA it prints one line and exits 0.
#
#   bash benchmarks/gpu_check.sh              # from the repository root or anywhere
#   GPU_CHECK_STEPS=50 bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check: skipped, no CUDA device (torch.cuda.is_available() is False)"
  exit 0
fi

"$PY" -c 'import torch; print("gpu_check:", torch.cuda.get_device_name(0), "torch", torch.__version__)'

# the tiny-config tests (tiny random Llama / GPT-2 / toy models: seconds each); the real-model ones are
# left to CI. Folders that do not exist yet are skipped.
tests=()
for t in tests/integrations tests/fsdp tests/lora tests/test_lora_pro.py tests/test_ema.py tests/optim; do
  [ -e "$t" ] && tests+=("$t")
done
"$PY" -m pytest -q -m "not integration" "${tests[@]}"

"$PY" -m benchmarks.gpu_timing --device cuda --steps "${GPU_CHECK_STEPS:-20}"
"$PY" -m benchmarks.render_docs
echo "gpu_check: done; results in benchmarks/results/gpu_timing.json"
