#!/usr/bin/env bash
# Past one GPU (issue 18), on a machine with two or more: the train job in N processes,
# DDP and FSDP, against one process at the same global batch (tokens/s, rank 0's peak
# against the estimate of one GPU), then evolve with one Ray actor per GPU against one
# actor (seconds per generation, each actor's GPU memory). Random weights of the real
# shapes: nothing is downloaded. Logs into ${OUT:-/tmp/kyara-gpu}.
#   Usage: bash bench/gpu/multi_gpu.sh [N (default: every GPU)] [train_s] [evolve_s]
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
out=${OUT:-/tmp/kyara-gpu}; mkdir -p "$out"
here=$(cd "$(dirname "$0")" && pwd)
py=${PYTHON:-python3}
n=${1:-$(nvidia-smi -L | wc -l)}
if [ "$n" -lt 2 ]; then echo "this needs two GPUs or more; $n visible" >&2; exit 2; fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $py -c "import torch, transformers, accelerate, ray; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'ray', ray.__version__)"
} 2>&1 | tee "$out/multi_versions.txt"
timeout "${2:-480}" $py "$here/train_gemma2_2b.py" --random tiny --steps 20 --batch $((4 * n)) \
    --modes lora,lora-ddp,lora-fsdp --processes "$n" 2>&1 | tee "$out/multi_train.log"
timeout "${3:-300}" $py "$here/../evolve_ray.py" --device cuda --cpus $((2 * n)) \
    --modes "ray 1,ray $n" --hidden 2048 --layers 16 --vocab 32000 --population $((2 * n)) \
    --generations 3 --dir /tmp/kyara-evolve-ray-gpu 2>&1 | tee "$out/multi_evolve.log"
