#!/usr/bin/env bash
# GPU smoke run of the debug VLM (bf16 autocast, CUDA): the numbers go to docs/benchmarks.md.
#   bash scripts/gpu_smoke.sh OUT_DIR
set -euo pipefail
out=${1:-/tmp/gpu_smoke}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)" | tee -a "$out/gpu.txt"
python3 train.py --job.config_file train_configs/debug_vlm.toml --job.dump_folder "$out/run" \
    --training.steps 200 --metrics.log_freq 50 --checkpoint.interval 100 2>&1 | grep -v Warning | tee "$out/train.log"
python3 scripts/eval_grounding.py --job.config_file train_configs/debug_vlm.toml --job.dump_folder "$out/run" 2>&1 | grep -v -i warn | tee -a "$out/train.log"
