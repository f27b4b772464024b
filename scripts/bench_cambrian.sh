#!/usr/bin/env bash
# Cambrian at real size (SigLIP2-so400m + CLIP-L + DINOv2-L -> SVA -> Qwen3-8B) beside the
# single-encoder LLaVA preset (SigLIP2-so400m -> Qwen3-8B) on one GPU, in one job: the trainer's own
# path (scripts/bench_train.py) on the bundled captions, FSDP off, full activation checkpointing,
# compile, bf16 parameters and AdamW state (9.5B parameters: 76 GB of states, so one H200).
# MFU counts every encoder, the aggregator and the in-decoder SVA layers (training_flops).
# Both read each image at about 600 image tokens: Cambrian 24 x (24 + 1), LLaVA about 24 x 24 patches
# of 16 px (every image resized to about 384 x 384 px, up to 609 patches for other aspect ratios,
# one image a slot of 640); rows of 8192 tokens hold 13 images (checked on a CPU: 441 and 389 TFLOP
# a step).
#
#     scripts/bench_cambrian.sh OUTDIR      # writes OUTDIR/bench_train_{cambrian,llava}_qwen3_8b.json
#
# DECODER=qwen3-4b (the default on a GPU of less than 100 GB, e.g. an H100) runs the same towers and
# aggregator on Qwen3-4B, the largest that fits one 80 GB GPU.
#
# On a CPU the same path runs with the debug config:
#     python scripts/bench_train.py --job.config_file train_configs/cambrian_debug.toml --warmup 1 --steps 2
set -euo pipefail
OUT=${1:?usage: scripts/bench_cambrian.sh OUTDIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
COMMON=(--data.path assets/sample_data/captions_train.jsonl --data.dataset captions
        --model.tokenizer_path assets/tokenizer --training.seq_len 8192 --training.param_dtype bf16
        --activation_checkpoint.mode full --compile.enable true --parallelism.data_parallel_shard_degree 1
        --data.image_slots_per_row 13 --warmup 4 --steps 8)
gib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1)
DECODER=${DECODER:-$([[ ${gib:-0} -lt 100000 ]] && echo qwen3-4b || echo qwen3-8b)}
d=${DECODER//[-.]/_}
"${PYTHON:-python3}" scripts/bench_train.py --job.config_file train_configs/cambrian_qwen3_8b.toml "${COMMON[@]}" \
    --model.flavor "siglip2-so400m-clip-l-dinov2-l-$DECODER" \
    --data.patches_per_slot 600 --name "cambrian_$d" --out "$OUT/bench_train_cambrian_$d.json"
"${PYTHON:-python3}" scripts/bench_train.py --job.config_file train_configs/llava_siglip2_qwen3_8b.toml "${COMMON[@]}" \
    --model.flavor "siglip2-so400m-$DECODER" --data.patches_per_slot 640 --data.min_pixels 147456 \
    --data.max_pixels 147456 --name "llava_$d" --out "$OUT/bench_train_llava_$d.json"
