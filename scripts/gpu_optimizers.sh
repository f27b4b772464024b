#!/usr/bin/env bash
# Issue 14's measurements on one GPU (docs/optimizers.md): the optimizer step, Muon against fused
# AdamW, on the Qwen3-VL-2B shape; then the trainer end to end on realistic captions with every
# module training (AdamW, Muon), with the vision encoder frozen, and with vision encoder and decoder
# frozen (the projector alone trains): tokens/s and peak memory. Every JSON and log goes to OUTDIR.
#
#   bash scripts/gpu_optimizers.sh OUTDIR               # one H200 or H100: about 6 minutes
#   bash scripts/gpu_optimizers.sh OUTDIR --cpu-smoke   # the same steps with the debug flavor on a CPU
#
# torchdata, when not installed, is taken from a wheel in .whl/ (as scripts/gpu_real_data.sh).
# Environment knobs: PYTHON (python3), WARMUP (4) and STEPS (8) for bench_train, CAPTIONS (600)
# samples to generate, DATA (OUTDIR/data), PARAM_DTYPE (bf16, as docs/benchmarks.md's captions row;
# fp32 for master weights).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: scripts/gpu_optimizers.sh OUTDIR [--cpu-smoke]}
smoke=${2:-}
mkdir -p "$out"
out=$(cd "$out" && pwd)
PYTHON=${PYTHON:-python3}
data=${DATA:-$out/data}
PARAM_DTYPE=${PARAM_DTYPE:-bf16}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PYTHON" -c "import torchdata" 2>/dev/null; then
    "$PYTHON" -m pip install --quiet --no-deps --no-index --target "$out/site" .whl/torchdata-*.whl
    export PYTHONPATH="$PYTHONPATH:$out/site"
fi

if [ "$smoke" = "--cpu-smoke" ]; then
    WARMUP=${WARMUP:-1} STEPS=${STEPS:-1} CAPTIONS=${CAPTIONS:-24}
    optimizer_shape=(--flavor debug --device cpu --warmup 1 --steps 2)
    qwen3=(--job.config_file train_configs/qwen3_vl_debug.toml)
else
    WARMUP=${WARMUP:-4} STEPS=${STEPS:-8} CAPTIONS=${CAPTIONS:-600}
    optimizer_shape=(--flavor 2B --param-dtype "$PARAM_DTYPE")
    # docs/benchmarks.md's captions row: 5 x 5120 patch slots, no activation checkpointing
    qwen3=(--job.config_file train_configs/qwen3_vl_2b.toml --training.seq_len 8192 --model.attention_backend flex
           --data.image_slots_per_row 5 --data.patches_per_slot 5120)
fi
common=("${qwen3[@]}" --model.tokenizer_path assets/tokenizer --data.num_workers auto --warmup "$WARMUP"
        --steps "$STEPS" --training.param_dtype "$PARAM_DTYPE" --activation_checkpoint.mode none
        --data.dataset captions --data.path "$data/captions/captions.jsonl")

run() {  # run NAME CMD...: the command's output into OUTDIR/NAME.log, its status into the summary
    local name=$1; shift
    echo "== $name: $*" | tee -a "$out/summary.txt"
    local start=$SECONDS
    if "$@" > "$out/$name.log" 2>&1; then status=ok; else status="FAILED ($?)"; fi
    echo "   $status in $((SECONDS - start)) s" | tee -a "$out/summary.txt"
    grep -E '^\| ' "$out/$name.log" | grep -v '^|---' | tail -4 | sed 's/^/   /' || true
}

run bench_optimizer "$PYTHON" scripts/bench_optimizer.py --family qwen3_vl "${optimizer_shape[@]}" --out "$out"
[ -s "$data/captions/captions.jsonl" ] || run make_data "$PYTHON" scripts/make_realistic_data.py --out "$data" \
    --kinds captions --captions "$CAPTIONS"
for variant in full full_muon freeze_vision freeze_vision_decoder; do
    case $variant in
        full) extra=() ;;
        full_muon) extra=(--optimizer.name muon) ;;
        freeze_vision) extra=(--training.freeze vision) ;;
        freeze_vision_decoder) extra=(--training.freeze vision,decoder) ;;
    esac
    run "bench_train_$variant" "$PYTHON" scripts/bench_train.py "${common[@]}" "${extra[@]}" --name "$variant" \
        --out "$out/bench_train_$variant.json"
done
echo "total $SECONDS s" | tee -a "$out/summary.txt"
! grep -q FAILED "$out/summary.txt"
