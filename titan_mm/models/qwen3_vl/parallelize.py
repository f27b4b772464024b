"""How Qwen3-VL is parallelized: activation checkpointing, then compile, then FSDP2."""

import torch
from torch.distributed.device_mesh import DeviceMesh

from titan_mm.config import ActivationCheckpoint, Compile
from titan_mm.models.qwen3_vl.model import Qwen3VLModel
from titan_mm.parallel.common import apply_activation_checkpointing, apply_compile, apply_fsdp, fsdp_mesh
from titan_mm.parallel.parallel_dims import ParallelDims


def parallelize_qwen3_vl(model: Qwen3VLModel, parallel_dims: ParallelDims, mesh: DeviceMesh | None,
                         compile_cfg: Compile, ac_cfg: ActivationCheckpoint, param_dtype: torch.dtype):
    # a later pipeline stage has no vision encoder
    block_groups = [part.layers for part in (model.vision, model.decoder) if part is not None]
    if ac_cfg.mode == "full":
        for blocks in block_groups:
            apply_activation_checkpointing(blocks)
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


def pipeline_first_stage_layers(args) -> int:
    """DeepStack adds vision features after decoder layers 0 .. k-1: they must be on the first
    pipeline stage, with the vision encoder."""
    return len(args.vision.deepstack_layers)
