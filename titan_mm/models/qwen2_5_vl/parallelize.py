"""How Qwen2.5-VL is parallelized: tensor parallelism, then activation checkpointing, then compile,
then FSDP2."""

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

from titan_mm.config import ActivationCheckpoint, Compile
from titan_mm.models.qwen2_5_vl.model import Qwen2_5_VLModel
from titan_mm.parallel.activation_checkpoint import apply_activation_checkpointing
from titan_mm.parallel.common import apply_compile, apply_fsdp, fsdp_mesh
from titan_mm.parallel.parallel_dims import ParallelDims
from titan_mm.parallel.sequence import apply_sequence_parallel
from titan_mm.parallel.tensor_parallel import (apply_tp_decoder, apply_tp_embeddings_and_head, parallelize_block,
                                               qwen_vit_block_plan)


def parallelize_qwen2_5_vl(model: Qwen2_5_VLModel, parallel_dims: ParallelDims, mesh: DeviceMesh | None,
                           compile_cfg: Compile, ac_cfg: ActivationCheckpoint, param_dtype: torch.dtype):
    apply_sequence_parallel(model.decoder, mesh, parallel_dims)
    # a later pipeline stage has no vision encoder
    block_groups = [part.layers for part in (model.vision, model.decoder) if part is not None]
    if parallel_dims.tp_enabled:
        if model.vision is not None:
            apply_tp_vision(model.vision.layers, mesh["tp"])
        apply_tp_decoder(model.decoder.layers, mesh["tp"], model.args.decoder.qk_norm)
        apply_tp_embeddings_and_head(model.decoder, mesh["tp"], parallel_dims.loss_parallel_enabled)
    for blocks in block_groups:
        apply_activation_checkpointing(blocks, ac_cfg)
    if compile_cfg.enable:
        for blocks in block_groups:
            apply_compile(blocks)
    if parallel_dims.fsdp_enabled:
        # the merger's (4 * vision dim)^2 weight is large enough to gather on its own
        vision = [*model.vision.layers.values(), model.vision.merger] if model.vision is not None else []
        blocks = [*vision, *model.decoder.layers.values()]
        apply_fsdp(blocks, model, fsdp_mesh(mesh, parallel_dims.dp_replicate), param_dtype)
    return model


def apply_tp_vision(blocks: nn.ModuleDict, tp_mesh: DeviceMesh):
    """ViT blocks, window and full attention alike: forward(x_NLD, cos, sin, frame_mask, window_mask).

    Sequence parallelism splits the patch axis L for the RMSNorms; attention (q/k/v by heads) and
    the SwiGLU MLP (by hidden units) run on all L patches. The merger stays replicated.
    """
    plan = qwen_vit_block_plan({"mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(),
                                "mlp.down_proj": RowwiseParallel(output_layouts=Shard(1))})
    for block in blocks.values():
        parallelize_block(block, tp_mesh, plan, n_extra_inputs=4)
