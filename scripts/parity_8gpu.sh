#!/usr/bin/env bash
# Issue 7's loss-parity table: each 3-D layout on 8 GPUs against one GPU, for the Qwen2.5-VL and
# Qwen3-VL debug flavors. Both sides start from one seed checkpoint and read the same global
# batches (data.num_shards = 2: two data streams, both on the one GPU, one per data-parallel rank on
# eight); fp32, so the differences are the collectives' reduction order only.
#
#   [PYTHON=python3] scripts/parity_8gpu.sh [STEPS] [NGPU]   # defaults: 20 steps, 8 GPUs; a Markdown table per run
#
# On CPU it runs the same way with gloo (slowly): scripts/parity_8gpu.sh 3.
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-20}
NGPU=${2:-8}
PYTHON=${PYTHON:-python3}
export NCCL_NVLS_ENABLE=0 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
common=(--training.mixed_precision fp32 --training.seq_len 256 --data.image_slots_per_row 10 --data.num_shards 2
        --metrics.log_freq 1)
fsdp_tp=(--parallelism.data_parallel_shard_degree 2 --parallelism.tensor_parallel_degree 2)
status=0
for family in qwen2_5_vl qwen3_vl; do
    split=()
    [ "$family" = qwen3_vl ] && split=(--parallelism.pipeline_parallel_split_points 3)  # DeepStack layers on stage 0
    for layout in cp ulysses pp; do
        case $layout in
            cp) b=("${fsdp_tp[@]}" --parallelism.context_parallel_degree 2); rows=1; flavor=debug ;;
            ulysses) b=("${fsdp_tp[@]}" --parallelism.ulysses_degree 2); rows=1; flavor=debug ;;
            pp) b=("${fsdp_tp[@]}" --parallelism.pipeline_parallel_degree 2 "${split[@]}"); rows=2; flavor=debug-untied ;;
        esac
        echo "## $family: FSDP(2) x ${layout^^}(2) x TP(2) on $NGPU vs 1, $STEPS steps"
        "$PYTHON" scripts/compare_losses.py --config "train_configs/${family}_debug.toml" --steps "$STEPS" \
            --a "nproc=1 --training.local_batch_size $((2 * rows))" \
            --b "nproc=$NGPU --training.local_batch_size $rows ${b[*]}" \
            -- "${common[@]}" --model.flavor "$flavor" | sed -n '/^| step/,$p' || status=1
    done
done
exit $status
