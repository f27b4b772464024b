#!/usr/bin/env bash
# The one-GPU measurements of the features after issue 12, in one job, each step bounded so one
# failing step does not take the others with it (outputs and logs under OUTDIR):
#   - the MDLM objective beside causal LM on realistic captions (Qwen3-VL-2B, 8192 tokens; docs/objectives.md)
#   - greedy decoding, titan_mm (eager, CUDA graph) beside transformers' generate (docs/generation.md)
#   - the optimizer step, Muon against fused AdamW (docs/optimizers.md)
#   - LoRA and a frozen vision tower against full fine-tuning (docs/lora.md, docs/optimizers.md)
#   - Cambrian's preset beside LLaVA SigLIP2-so400m on the same decoder (docs/cambrian.md): Qwen3-8B
#     on an H200 (76 GB of bf16 states), Qwen3-4B on an 80 GB GPU
#
#   bash scripts/gpu_features.sh OUTDIR      # one H100: about 15 minutes (docs/benchmarks.md)
#
# torchdata, when not installed, is taken from a wheel in .whl/ (as scripts/gpu_real_data.sh does).
# STAGES picks steps (default: all of data captions mdlm generate optimizer lora frozen cambrian).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: scripts/gpu_features.sh OUTDIR}
mkdir -p "$out" && out=$(cd "$out" && pwd)
PYTHON=${PYTHON:-python3}
STAGES=${STAGES:-data captions mdlm generate optimizer lora frozen cambrian}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if ! "$PYTHON" -c "import torchdata" 2>/dev/null; then
    "$PYTHON" -m pip install --quiet --no-deps --no-index --target "$out/site" .whl/torchdata-*.whl
    export PYTHONPATH="$PYTHONPATH:$out/site"
fi
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; git rev-parse HEAD
  "$PYTHON" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} > "$out/env.txt" 2>&1
has() { [[ " $STAGES " == *" $1 "* ]]; }
step() {  # step NAME SECONDS CMD...: the command's output into OUTDIR/NAME.log; its table rows echoed
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    echo "== $name: exit $? in $((SECONDS - start)) s" | tee -a "$out/summary.txt"
    grep -E '^\|' "$out/$name.log" | grep -v -- '---' | tail -7 | tee -a "$out/summary.txt"
}
data=$out/data/captions/captions.jsonl
qwen3=(--job.config_file train_configs/qwen3_vl_2b.toml --training.seq_len 8192 --model.attention_backend flex
       --model.tokenizer_path assets/tokenizer --data.num_workers 8 --warmup 4 --steps 8 --training.param_dtype bf16
       --data.dataset captions --data.path "$data" --data.image_slots_per_row 5 --data.patches_per_slot 5120
       --activation_checkpoint.mode none)
has data && step data 120 "$PYTHON" scripts/make_realistic_data.py --out "$out/data" --kinds captions --captions 600
has captions && step captions 150 "$PYTHON" scripts/bench_train.py "${qwen3[@]}" --name qwen3_vl_captions \
    --out "$out/captions.json"
has mdlm && step mdlm 150 "$PYTHON" scripts/bench_train.py "${qwen3[@]}" --objective.name mdlm \
    --objective.mdlm_antithetic true --name qwen3_vl_captions_mdlm --out "$out/captions_mdlm.json"
has generate && step generate 240 "$PYTHON" scripts/bench_generate.py --flavor 2B --device cuda --new_tokens 128 \
    --batch_sizes 1,16 --out "$out/generate"
has optimizer && step optimizer 120 "$PYTHON" scripts/bench_optimizer.py --family qwen3_vl --flavor 2B --param-dtype bf16 \
    --out "$out/optimizer"
has lora && step lora 150 "$PYTHON" scripts/bench_train.py "${qwen3[@]}" --lora.enabled true --lora.rank 16 \
    --lora.alpha 32 --name qwen3_vl_captions_lora16 --out "$out/captions_lora16.json"
has frozen && step frozen_vision 150 "$PYTHON" scripts/bench_train.py "${qwen3[@]}" --training.freeze vision \
    --name qwen3_vl_captions_frozen_vision --out "$out/captions_frozen_vision.json"
has cambrian && step cambrian 600 bash scripts/bench_cambrian.sh "$out/cambrian"
echo "total $SECONDS s" | tee -a "$out/summary.txt"
