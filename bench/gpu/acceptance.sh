#!/usr/bin/env bash
# The GPU acceptance run (issue 24) in one go, on real weights (the embedded Gemma 3 270M,
# dequantised as the quick-start does): hf chat with and without an adapter, LoRA and QLoRA
# training against the memory planner, GGUF export, GGUF chat with every layer offloaded,
# an eval job and one evolve generation judged by a local llama.cpp server. It runs the
# tests marked gpu in tests/gpu (`make test-gpu`) and prints their figures: tokens/s, peak
# GiB against the planner's estimate, seconds per stage.
#
#   bash bench/gpu/acceptance.sh          on the GPU server, after `make venv` there (a CUDA
#                                         build of llama.cpp: `kyara doctor` says if not)
#   bash bench/gpu/acceptance.sh --cpu    the same flow on the CPU, small (the dry run)
#
# Logs and figures.json go to ${OUT:-/tmp/kyara-acceptance}; the whole run is capped at
# ${ACCEPTANCE_TIMEOUT_S:-480} s. Exit status: pytest's (0: every stage passed), 2 when
# the machine cannot run it (no CUDA GPU for torch, or a CPU build of llama.cpp).
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
repo=$(cd "$(dirname "$0")/../.." && pwd)
cd "$repo" || exit 2
py=${PYTHON:-$repo/.venv/bin/python}
out=${OUT:-/tmp/kyara-acceptance}
mkdir -p "$out" && chmod 700 "$out"
device=cuda
[ "${1:-}" = "--cpu" ] && device=cpu
figures="$out/figures-$device.json"
rm -f "$figures"

if ! "$py" -c "import pipelines" 2>/dev/null; then
    echo "acceptance: $py cannot import kyara's pipelines: run \`make venv\` first (or set PYTHON)" >&2
    exit 2
fi
{ date -u +"%Y-%m-%dT%H:%M:%SZ"
  git -C "$repo" rev-parse --short HEAD 2>/dev/null
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$py" -c "import torch, transformers, peft, trl, llama_cpp
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'visible', torch.cuda.is_available())
print('transformers', transformers.__version__, 'peft', peft.__version__, 'trl', trl.__version__)
print('llama-cpp-python', llama_cpp.__version__, 'gpu offload', llama_cpp.llama_supports_gpu_offload())"
} 2>&1 | tee "$out/versions.txt"

if [ "$device" = cuda ]; then
    "$py" - <<'EOF' || exit 2
import sys
import llama_cpp
import torch
if not torch.cuda.is_available():
    sys.exit("acceptance: torch sees no CUDA GPU here (torch %s); --cpu runs the dry run"
             % torch.__version__)
if not llama_cpp.llama_supports_gpu_offload():
    sys.exit('acceptance: llama-cpp-python here is a CPU build: make rebuild-llama '
             'CMAKE_ARGS="-DGGML_CUDA=on" (kyara doctor says the same)')
EOF
    if ! "$py" -c "import bitsandbytes" 2>/dev/null; then
        # QLoRA's 4-bit weights: not a kyara extra (CUDA only), as `make test-gpu` installs it
        echo "acceptance: installing bitsandbytes for the QLoRA stage"
        "$py" -m pip install -q "${BITSANDBYTES:-bitsandbytes>=0.46.1}" || exit 2
    fi
    marker=gpu
else
    marker=slow
fi

started=$(date +%s)
KYARA_ACCEPTANCE_FIGURES="$figures" timeout "${ACCEPTANCE_TIMEOUT_S:-480}" \
    "$py" -m pytest -p no:cacheprovider -m "$marker" -k "$device" tests/gpu -v -rs \
    --basetemp "$out/tmp" 2>&1 | tee "$out/pytest.log"
rc=$?
seconds=$(( $(date +%s) - started ))
[ "$rc" = 124 ] && echo "acceptance: stopped at ${ACCEPTANCE_TIMEOUT_S:-480} s" >&2

"$py" - "$figures" "$device" "$seconds" <<'EOF'
import json
import sys
from pathlib import Path

path, device, seconds = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
data = json.loads(path.read_text("utf-8")).get(device, {}) if path.is_file() else {}
print(f"\nacceptance figures ({device}, {seconds} s in all; {path}):")
if not data:
    print("  none: no stage got as far as measuring")
rows = [
    ("dequantise the GGUF to HF", "dequantise_s", "s"),
    ("hf chat", "hf_tokens_per_s", "tokens/s"),
    ("hf chat with the trained adapter", "hf_adapter_tokens_per_s", "tokens/s"),
    ("gguf chat (every layer on the GPU)" if device == "cuda" else "gguf chat",
     "gguf_tokens_per_s", "tokens/s"),
    ("gguf weights + cache on the GPU", "gguf_gpu_gib_loaded", "GiB"),
    ("LoRA training", "lora_seconds", "s"),
    ("QLoRA training", "qlora_seconds", "s"),
    ("eval job", "eval_seconds", "s"),
    ("evolve, one generation", "evolve_seconds", "s"),
]
for label, key, unit in rows:
    if key in data:
        value = data[key]
        print(f"  {label:<36} {value:>10.{1 if value >= 10 else 2}f} {unit}")
for kind in ("lora", "qlora"):
    peak, estimate = data.get(f"{kind}_peak_gib"), data.get(f"{kind}_estimate_gib")
    if peak is not None and estimate:
        print(f"  {kind + ' peak / planner estimate':<36} {peak:>10} / {estimate} GiB "
              f"({peak / estimate:.2f}x)")
if "eval_scores" in data:
    print(f"  {'eval verdicts parsed':<36} {data['eval_scores_ok']:>10} / {data['eval_scores']}"
          f" scores, {data.get('eval_pairs_ok')} pairs")
if "evolve_ok" in data:
    print(f"  {'evolve candidates with a fitness':<36} {data['evolve_ok']:>10}")
EOF
exit "$rc"
