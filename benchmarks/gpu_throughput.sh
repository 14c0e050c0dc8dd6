#!/usr/bin/env bash
# The trainer's GPU check, as one script for a lent device machine (its image has torch,
# transformers and peft; carry the project's packages): medforge-train against the plain peft
# loop and the speed-of-light LoRA step on a ViT-B/16-sized CLIP vision tower at 224 px.
#   bash benchmarks/gpu_throughput.sh [OUT_DIR]    (writes train_throughput_gpu.json there)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/results}"
mkdir -p "$out"
export PYTHONPATH="$PWD:$PWD/common:$PWD/trainer-image:$PWD/merger-image${PYTHONPATH:+:$PYTHONPATH}"
python - <<'PY'
import torch
assert torch.cuda.is_available(), "no GPU visible"
print(torch.__version__, torch.cuda.get_device_name(0), flush=True)
PY
python benchmarks/train_throughput.py --device cuda --compile auto --batch 0 \
  --per-class 1024 --epochs 3 --width 768 --layers 12 --image 224 \
  --sol-batches 128 256 --sol-steps 30 --rounds 2 --out "$out/train_throughput_gpu.json"
