"""Activation checkpointing of transformer blocks: full, every k-th block, or per-op selective.

Blocks are wrapped in place (checkpoint_wrapper, non-reentrant), after tensor parallelism and before
compile and FSDP. "op" follows torchtitan's selective policy: a block's forward runs under
torch.utils.checkpoint's selective contexts, which keep the outputs of the expensive ops listed
below and recompute everything else in backward.
"""

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from titan_mm.config import ActivationCheckpoint

_MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default}

_ALWAYS_SAVED = {
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.higher_order.flex_attention,
    # recomputing a tensor-parallel reduce-scatter would repeat the communication
    torch.ops._c10d_functional.reduce_scatter_tensor.default,
}


def apply_activation_checkpointing(blocks: nn.ModuleDict, cfg: ActivationCheckpoint):
    """Wrap the blocks ``cfg`` selects (see config.ActivationCheckpoint)."""
    if cfg.mode == "none":
        return
    if cfg.mode == "selective" and cfg.selective_ac_option == "op":
        for name in list(blocks):
            blocks[name] = checkpoint_wrapper(blocks[name], context_fn=_op_selective_contexts,
                                              preserve_rng_state=False)
        return
    every = 1 if cfg.mode == "full" else int(cfg.selective_ac_option)
    for i, name in enumerate(list(blocks)):
        if (i + 1) % every == 0:
            blocks[name] = checkpoint_wrapper(blocks[name], preserve_rng_state=False)


def _op_selective_contexts():
    """Fresh (forward, recompute) contexts for one checkpointed block call.

    Matmul outputs are saved except every second one, which is recomputed: that halves their
    memory for the price of recomputing half the matmuls (torchtitan's trade-off). The count is kept
    separately for the forward and the recompute so both make the same decisions.
    """
    matmuls = {"forward": 0, "recompute": 0}

    def policy(ctx, op, *args, **kwargs):
        if op in _MATMULS:
            phase = "recompute" if ctx.is_recompute else "forward"
            matmuls[phase] += 1
            return CheckpointPolicy.PREFER_RECOMPUTE if matmuls[phase] % 2 == 0 else CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.MUST_SAVE if op in _ALWAYS_SAVED else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)
