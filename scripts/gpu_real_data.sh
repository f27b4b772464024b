#!/usr/bin/env bash
# Issue 12's measurements in one job on one GPU: the synthetic benchmark beside HF transformers, then
# the trainer end to end on realistic data (docs/benchmarks.md "Real data"). Every JSON and log goes
# to OUTDIR.
#
#   bash scripts/gpu_real_data.sh OUTDIR               # one H200: about 8 minutes
#   bash scripts/gpu_real_data.sh OUTDIR --cpu-smoke   # the same steps with the debug flavors on a CPU
#
# Needs shared/bench/ (hf_vlm_baseline.py, hf_real_baseline.py) copied into the repository root;
# torchdata, when not installed, is taken from a wheel in .whl/. Environment knobs: PYTHON (python3),
# WARMUP (4) and STEPS (8) for bench_train, STAGES (all of: data hf_synthetic synthetic hf_real
# captions chat qwen25; also captions_varlen, synthetic_varlen, and
# captions_mdlm, chat_mdlm: the MDLM objective), CAPTIONS (600) and
# CHATS (300) samples to generate, DATA (OUTDIR/data) where the generated data lives, PARAM_DTYPE
# (bf16: parameters, gradients and AdamW state in bf16, as the synthetic bench and HF keep them;
# fp32: the trainer's default master weights),
# NUM_WORKERS (auto) loader workers.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: scripts/gpu_real_data.sh OUTDIR [--cpu-smoke]}
smoke=${2:-}
mkdir -p "$out"
out=$(cd "$out" && pwd)
PYTHON=${PYTHON:-python3}
STAGES=${STAGES:-data hf_synthetic synthetic hf_real captions chat qwen25}
data=${DATA:-$out/data}
PARAM_DTYPE=${PARAM_DTYPE:-bf16}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PYTHON" -c "import torchdata" 2>/dev/null; then
    "$PYTHON" -m pip install --quiet --no-deps --no-index --target "$out/site" .whl/torchdata-*.whl
    export PYTHONPATH="$PYTHONPATH:$out/site"
fi

if [ "$smoke" = "--cpu-smoke" ]; then
    WARMUP=${WARMUP:-1} STEPS=${STEPS:-1} CAPTIONS=${CAPTIONS:-24} CHATS=${CHATS:-12}
    qwen3=(--job.config_file train_configs/qwen3_vl_debug.toml)
    qwen25=(--job.config_file train_configs/qwen2_5_vl_debug.toml)
    hf_tiny=(--tiny --seq-len 1024 --max-pixels 65536)
    STAGES=${STAGES// hf_synthetic/}; STAGES=${STAGES// synthetic/}  # both need CUDA
else
    WARMUP=${WARMUP:-4} STEPS=${STEPS:-8} CAPTIONS=${CAPTIONS:-600} CHATS=${CHATS:-300}
    qwen3=(--job.config_file train_configs/qwen3_vl_2b.toml --training.seq_len 8192 --model.attention_backend flex)
    qwen25=(--job.config_file train_configs/qwen2_5_vl_7b.toml --model.flavor 3B --training.seq_len 8192
            --model.attention_backend flex)
    hf_tiny=()
fi
# the bundled tokenizer (no HF download on the GPU machine); chats in its plain ChatML
common=(--model.tokenizer_path assets/tokenizer --data.num_workers "${NUM_WORKERS:-auto}" --warmup "$WARMUP" --steps "$STEPS"
        --training.param_dtype "$PARAM_DTYPE")
captions=(--data.dataset captions --data.path "$data/captions/captions.jsonl")
# the MDLM objective (issue 13) on the same data: masked diffusion, attention bidirectional per document
mdlm=(--objective.name mdlm --objective.mdlm_antithetic true)
# captions (one image each, ~1,500 patches) pack tighter into 5 x 5120 than into the chat configs'
# 6 x 4096 (plan_batch on the generated captions); the debug flavors keep their own
[ "$smoke" = "--cpu-smoke" ] || captions+=(--data.image_slots_per_row 5 --data.patches_per_slot 5120)
chat=(--data.dataset chat --data.chat_format plain --data.path "$data/chat/chat.jsonl")

has() { [[ " $STAGES " == *" $1 "* ]]; }
run() {  # run NAME CMD...: the command's output into OUTDIR/NAME.log, its status into the summary
    local name=$1; shift
    echo "== $name: $*" | tee -a "$out/summary.txt"
    local start=$SECONDS
    if "$@" > "$out/$name.log" 2>&1; then status=ok; else status="FAILED ($?)"; fi
    echo "   $status in $((SECONDS - start)) s" | tee -a "$out/summary.txt"
    grep -E '^\| |expected padding|tokens/s' "$out/$name.log" | grep -v '^|---' | tail -4 | sed 's/^/   /' || true
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no GPU"
  nproc
  "$PYTHON" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
} > "$out/env.txt" 2>&1 || true
cat "$out/env.txt"

has data && [ ! -s "$data/chat/chat.jsonl" ] && run make_data "$PYTHON" scripts/make_realistic_data.py --out "$data" --kinds captions,chat \
    --captions "$CAPTIONS" --chats "$CHATS"
has hf_synthetic && run hf_synthetic env OUT="$out" "$PYTHON" shared/bench/hf_vlm_baseline.py
has synthetic && run bench_synthetic "$PYTHON" scripts/bench.py --hf-json "$out/hf_baseline.json" --backend flex \
    --out "$out/bench_synthetic.json"
has synthetic_varlen && run bench_synthetic_varlen "$PYTHON" scripts/bench.py --hf-json "$out/hf_baseline.json" \
    --backend varlen --out "$out/bench_synthetic_varlen.json"
has hf_real && run hf_real env OUT="$out" "$PYTHON" shared/bench/hf_real_baseline.py --data "$data/captions/captions.jsonl" \
    --tokenizer assets/tokenizer/tokenizer.json --bos --warmup 3 --steps "$STEPS" "${hf_tiny[@]}"
has captions && run bench_train_qwen3_vl_captions "$PYTHON" scripts/bench_train.py "${qwen3[@]}" "${common[@]}" \
    "${captions[@]}" --activation_checkpoint.mode none --name qwen3_vl_captions --out "$out/bench_train_qwen3_vl_captions.json"
has captions_varlen && run bench_train_qwen3_vl_captions_varlen "$PYTHON" scripts/bench_train.py "${qwen3[@]}" \
    "${common[@]}" "${captions[@]}" --activation_checkpoint.mode none --model.attention_backend varlen \
    --name qwen3_vl_captions_varlen --out "$out/bench_train_qwen3_vl_captions_varlen.json"
has captions_mdlm && run bench_train_qwen3_vl_captions_mdlm "$PYTHON" scripts/bench_train.py "${qwen3[@]}" \
    "${common[@]}" "${captions[@]}" "${mdlm[@]}" --activation_checkpoint.mode none --name qwen3_vl_captions_mdlm \
    --out "$out/bench_train_qwen3_vl_captions_mdlm.json"
has chat_mdlm && run bench_train_qwen3_vl_chat_mdlm "$PYTHON" scripts/bench_train.py "${qwen3[@]}" "${common[@]}" \
    "${chat[@]}" "${mdlm[@]}" --activation_checkpoint.mode none --name qwen3_vl_chat_mdlm \
    --out "$out/bench_train_qwen3_vl_chat_mdlm.json"
has chat && run bench_train_qwen3_vl_chat "$PYTHON" scripts/bench_train.py "${qwen3[@]}" "${common[@]}" \
    "${chat[@]}" --activation_checkpoint.mode none --name qwen3_vl_chat --out "$out/bench_train_qwen3_vl_chat.json"
has qwen25 && run bench_train_qwen2_5_vl_chat_op "$PYTHON" scripts/bench_train.py "${qwen25[@]}" "${common[@]}" \
    "${chat[@]}" --activation_checkpoint.mode selective --activation_checkpoint.selective_ac_option op \
    --name qwen2_5_vl_chat_op --out "$out/bench_train_qwen2_5_vl_chat_op.json"
echo "total $SECONDS s" | tee -a "$out/summary.txt"
! grep -q FAILED "$out/summary.txt"
