"""How Qwen3-VL is parallelized: tensor parallelism, then activation checkpointing, then compile,
then FSDP2."""

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

from titan_mm.config import ActivationCheckpoint, Compile
from titan_mm.models.qwen3_vl.model import Qwen3VLModel
from titan_mm.parallel.activation_checkpoint import apply_activation_checkpointing
from titan_mm.parallel.common import apply_compile, apply_fsdp, fsdp_mesh
from titan_mm.parallel.parallel_dims import ParallelDims
from titan_mm.parallel.sequence import apply_sequence_parallel
from titan_mm.parallel.tensor_parallel import (apply_tp_decoder, apply_tp_embeddings_and_head, parallelize_block,
                                               qwen_vit_block_plan)


def parallelize_qwen3_vl(model: Qwen3VLModel, parallel_dims: ParallelDims, mesh: DeviceMesh | None,
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
        vision = []
        if model.vision is not None:
            # each merger holds two (4 * vision dim)^2-sized weights: large enough to gather on its own
            mergers = [model.vision.merger, *model.vision.deepstack_mergers.values()]
            vision = [*model.vision.layers.values(), *mergers]
        blocks = [*vision, *model.decoder.layers.values()]
        apply_fsdp(blocks, model, fsdp_mesh(mesh, parallel_dims.dp_replicate), param_dtype)
    return model


def apply_tp_vision(blocks: nn.ModuleDict, tp_mesh: DeviceMesh):
    """ViT blocks: forward(x_NLD, cos, sin, mask).

    Sequence parallelism splits the patch axis L for the LayerNorms; attention (q/k/v by heads) and
    the GELU MLP (by hidden units) run on all L patches. The merger and the DeepStack mergers read
    the whole stream between blocks and stay replicated.
    """
    plan = qwen_vit_block_plan({"mlp.linear_fc1": ColwiseParallel(),
                                "mlp.linear_fc2": RowwiseParallel(output_layouts=Shard(1))})
    for block in blocks.values():
        parallelize_block(block, tp_mesh, plan, n_extra_inputs=3)


def pipeline_first_stage_layers(args) -> int:
    """DeepStack adds vision features after decoder layers 0 .. k-1: they must be on the first
    pipeline stage, with the vision encoder."""
    return len(args.vision.deepstack_layers)
