#!/usr/bin/env bash
# On the lent GPU machine (device tool), after `.venv/bin/python -m benchmarks.gpu_series --prepare` here:
#   run(command="bash benchmarks/gpu_series.sh", carry=[".whl", ".gpu-carry"], timeout_s=600)
# Installs the carried wheels beside the image's torch/transformers, puts the built tokenizer in the cache,
# and runs the series on the full-size random Phi-3-mini, then the GPU speed benchmark. Report: $OUT/gpu_series.md
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PHI3_LORA_CACHE=/tmp/phi3-cache PHI3_LORA_OUTPUTS=/tmp/phi3-outputs OUT="${OUT:-$PWD/outputs/gpu}"
mkdir -p "$PHI3_LORA_CACHE" "$OUT"
cp -r .gpu-carry/phi3-tokenizer-v1 "$PHI3_LORA_CACHE/"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia-smi.txt"
python3 -m benchmarks.gpu_series --report-dir "$OUT" 2>&1 | tee "$OUT/gpu_series.log"
