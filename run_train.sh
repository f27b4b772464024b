#!/usr/bin/env bash
# Launch training with torchrun.
#   CONFIG_FILE=train_configs/debug_vlm.toml NGPU=1 ./run_train.sh --training.steps 20
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR and MASTER_PORT on every node (README: Multi-node).
set -euo pipefail
cd "$(dirname "$0")"

CONFIG_FILE=${CONFIG_FILE:-train_configs/debug_vlm.toml}
NGPU=${NGPU:-1}
NNODES=${NNODES:-1}

if [ "$NNODES" -gt 1 ]; then
    rdzv=(--nnodes="$NNODES" --node_rank="${NODE_RANK:?set NODE_RANK}" --rdzv_backend=c10d
          --rdzv_endpoint="${MASTER_ADDR:?set MASTER_ADDR}:${MASTER_PORT:-29500}"
          --rdzv_id="${RDZV_ID:-titan_mm}")
else
    rdzv=(--standalone --nnodes=1)
fi

# Preemption (docs/reliability.md): torchrun forwards SIGTERM and SIGUSR1 to the ranks, which save a
# checkpoint at the end of their step and exit 0; torchrun gives them TORCH_ELASTIC_SHUTDOWN_TIMEOUT
# seconds for it (torch >= 2.12; older versions wait 30 s), then exits 1 (its "got signal" error).
export PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-300}

exec python -m torch.distributed.run "${rdzv[@]}" --nproc_per_node="$NGPU" --local-ranks-filter="${LOG_RANK:-0}" \
    train.py --job.config_file "$CONFIG_FILE" "$@"
