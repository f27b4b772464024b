#!/usr/bin/env bash
# Memory and speed of LoRA against full fine-tuning on one GPU, Qwen3-VL-2B shape at 8192 tokens
# (docs/lora.md): scripts/bench_train.py on realistic captions, twice: every parameter trained,
# then LoRA (rank 16 on the decoder's attention and MLP, everything else frozen). Prints one table
# and writes bench_train_{full,lora}.json to OUTDIR.
#
#   bash scripts/bench_lora.sh OUTDIR               # one H100 / H200: a few minutes
#   bash scripts/bench_lora.sh OUTDIR --cpu-smoke   # the same with the debug flavor on a CPU
#
# torchdata, when not installed, is taken from a wheel in .whl/ (as scripts/gpu_real_data.sh does).
# Environment knobs: PYTHON (python3), WARMUP (4), STEPS (8), PARAM_DTYPE (bf16), RANK (16).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: scripts/bench_lora.sh OUTDIR [--cpu-smoke]}
smoke=${2:-}
mkdir -p "$out"
out=$(cd "$out" && pwd)
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PYTHON" -c "import torchdata" 2>/dev/null; then
    "$PYTHON" -m pip install --quiet --no-deps --no-index --target "$out/site" .whl/torchdata-*.whl
    export PYTHONPATH="$PYTHONPATH:$out/site"
fi

if [ "$smoke" = "--cpu-smoke" ]; then
    WARMUP=${WARMUP:-1} STEPS=${STEPS:-1} captions=24
    model=(--job.config_file train_configs/qwen3_vl_debug.toml)
else
    WARMUP=${WARMUP:-4} STEPS=${STEPS:-8} captions=600
    # one caption (~1,500 patches) per slot packs into 5 x 5120 (scripts/gpu_real_data.sh)
    model=(--job.config_file train_configs/qwen3_vl_2b.toml --training.seq_len 8192 --model.attention_backend flex
           --data.image_slots_per_row 5 --data.patches_per_slot 5120)
fi
[ -s "$out/data/captions/captions.jsonl" ] || "$PYTHON" scripts/make_realistic_data.py --out "$out/data" \
    --kinds captions --captions "$captions"
common=("${model[@]}" --model.tokenizer_path assets/tokenizer --data.dataset captions
        --data.path "$out/data/captions/captions.jsonl" --training.param_dtype "${PARAM_DTYPE:-bf16}"
        --activation_checkpoint.mode none --warmup "$WARMUP" --steps "$STEPS")
"$PYTHON" scripts/bench_train.py "${common[@]}" --name full --out "$out/bench_train_full.json" | tee "$out/full.log"
"$PYTHON" scripts/bench_train.py "${common[@]}" --lora.enabled true --lora.rank "${RANK:-16}" \
    --lora.alpha "$((2 * ${RANK:-16}))" --name lora --out "$out/bench_train_lora.json" | tee "$out/lora.log"
"$PYTHON" - "$out" <<'PY'
import json, sys
rows = [json.load(open(f"{sys.argv[1]}/bench_train_{name}.json")) for name in ("full", "lora")]
print(f"\n{rows[0]['model']}, {rows[0]['seq_len']} tokens, {rows[0]['device']}")
print("| run | useful tokens/s | peak GiB | step (s) |\n|---|---:|---:|---:|")
for r in rows:
    print(f"| {r['name']} | {r['useful_tokens_per_s']:,.0f} | {r['peak_mem_gib']:.2f} | {r['step_s']:.3f} |")
print(f"LoRA / full: {rows[1]['useful_tokens_per_s'] / rows[0]['useful_tokens_per_s']:.2f}x tokens/s, "
      f"{rows[1]['peak_mem_gib'] / rows[0]['peak_mem_gib']:.2f}x peak memory")
PY
