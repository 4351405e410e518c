#!/usr/bin/env bash
# The GPU benchmarks in one go, each capped at 24 GiB (the lab's RTX 3090) and each under
# its own time limit, logs into ${OUT:-/tmp/kyara-gpu}. Random weights of the real shapes:
# nothing is downloaded.  Usage: bash bench/gpu/run_all.sh [evolve_s prefer_s train_s]
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
out=${OUT:-/tmp/kyara-gpu}; mkdir -p "$out"
here=$(cd "$(dirname "$0")" && pwd)
py=${PYTHON:-python3}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $py -c "import torch, transformers, peft, trl; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'trl', trl.__version__)"
  df -h /tmp | tail -1; } 2>&1 | tee "$out/versions.txt"
timeout "${1:-240}" $py "$here/evolve_24gb.py" --dir /tmp/kyara-evolve-7b 2>&1 | tee "$out/evolve.log"
rm -rf /tmp/kyara-evolve-7b
timeout "${2:-200}" $py "$here/prefer_gemma2_2b.py" --random tiny --steps 20 2>&1 | tee "$out/prefer.log"
timeout "${3:-130}" $py "$here/train_gemma2_2b.py" --random tiny --steps 20 2>&1 | tee "$out/train.log"
