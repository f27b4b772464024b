"""How Qwen2.5-VL is parallelized: activation checkpointing, then compile, then FSDP2."""

import torch
from torch.distributed.device_mesh import DeviceMesh

from titan_mm.config import ActivationCheckpoint, Compile
from titan_mm.models.qwen2_5_vl.model import Qwen2_5_VLModel
from titan_mm.parallel.common import apply_activation_checkpointing, apply_compile, apply_fsdp, fsdp_mesh
from titan_mm.parallel.parallel_dims import ParallelDims


def parallelize_qwen2_5_vl(model: Qwen2_5_VLModel, parallel_dims: ParallelDims, mesh: DeviceMesh | None,
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
        # the merger's (4 * vision dim)^2 weight is large enough to gather on its own
        vision = [*model.vision.layers.values(), model.vision.merger] if model.vision is not None else []
        blocks = [*vision, *model.decoder.layers.values()]
        apply_fsdp(blocks, model, fsdp_mesh(mesh, parallel_dims.dp_replicate), param_dtype)
    return model
