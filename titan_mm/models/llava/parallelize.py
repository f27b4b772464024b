"""How the LLaVA family is parallelized: activation checkpointing, then compile, then FSDP2."""

import torch
from torch.distributed.device_mesh import DeviceMesh

from titan_mm.config import ActivationCheckpoint, Compile
from titan_mm.models.llava.model import LlavaModel
from titan_mm.parallel.common import apply_activation_checkpointing, apply_compile, apply_fsdp, fsdp_mesh
from titan_mm.parallel.parallel_dims import ParallelDims


def parallelize_llava(model: LlavaModel, parallel_dims: ParallelDims, mesh: DeviceMesh | None,
                      compile_cfg: Compile, ac_cfg: ActivationCheckpoint, param_dtype: torch.dtype):
    block_groups = (model.vision.layers, model.decoder.layers)
    if ac_cfg.mode == "full":
        for blocks in block_groups:
            apply_activation_checkpointing(blocks)
    if compile_cfg.enable:
        for blocks in block_groups:
            apply_compile(blocks)
    if parallel_dims.fsdp_enabled:
        blocks = [b for group in block_groups for b in group.values()]
        apply_fsdp(blocks, model, fsdp_mesh(mesh, parallel_dims.dp_replicate), param_dtype)
    return model
