"""How the LLaVA family is parallelized: sequence parallelism (CP or Ulysses), tensor parallelism, then activation checkpointing, then compile,
then FSDP2."""

import torch
from torch.distributed.device_mesh import DeviceMesh

from titan_mm.config import ActivationCheckpoint, Compile
from titan_mm.models.llava.model import LlavaModel
from titan_mm.parallel.activation_checkpoint import apply_activation_checkpointing
from titan_mm.parallel.common import apply_compile, apply_fsdp, fsdp_mesh
from titan_mm.parallel.parallel_dims import ParallelDims
from titan_mm.parallel.sequence import apply_sequence_parallel
from titan_mm.parallel.tensor_parallel import apply_tp_decoder, apply_tp_embeddings_and_head, apply_tp_vision


def parallelize_llava(model: LlavaModel, parallel_dims: ParallelDims, mesh: DeviceMesh | None,
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
        blocks = [b for group in block_groups for b in group.values()]
        apply_fsdp(blocks, model, fsdp_mesh(mesh, parallel_dims.dp_replicate), param_dtype)
    return model

