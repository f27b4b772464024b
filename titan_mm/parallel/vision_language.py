"""The parallelization order every vision-language family shares: sequence parallelism (CP or
Ulysses), tensor parallelism, activation checkpointing, compile, then FSDP2 (docs/parallelism.md).

A family supplies only what differs: its ViT's tensor-parallel plan and which vision modules
are FSDP units of their own.
"""

from typing import Callable

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from titan_mm.config import ActivationCheckpoint, Compile
from titan_mm.parallel.activation_checkpoint import apply_activation_checkpointing
from titan_mm.parallel.common import apply_compile, apply_fsdp, fsdp_mesh
from titan_mm.parallel.parallel_dims import ParallelDims
from titan_mm.parallel.sequence import apply_sequence_parallel
from titan_mm.parallel.tensor_parallel import apply_tp_decoder, apply_tp_embeddings_and_head


def parallelize_vision_language(model: nn.Module, parallel_dims: ParallelDims, mesh: DeviceMesh | None,
                                compile_cfg: Compile, ac_cfg: ActivationCheckpoint, param_dtype: torch.dtype,
                                *, apply_tp_vision: Callable[[nn.ModuleDict, DeviceMesh], None],
                                vision_fsdp_units: Callable[[nn.Module], list[nn.Module]],
                                vision_output: Callable[[nn.Module], nn.Module] = lambda model: model.vision,
                                ) -> nn.Module:
    """Parallelize a model with ``vision`` (None on a later pipeline stage) and a Llama-style
    ``decoder``. apply_tp_vision(vision.layers, tp_mesh) applies the ViT's TP plan;
    vision_fsdp_units(vision) lists the vision modules sharded on their own (its blocks, and
    mergers large enough to gather separately); vision_output(model) is the module whose output
    are the image embeddings the decoder takes (sequence parallelism gathers them there)."""
    apply_sequence_parallel(model, mesh, parallel_dims, vision_output(model))
    block_groups = [part.layers for part in (model.vision, model.decoder) if part is not None]
    if parallel_dims.tp_enabled:
        if model.vision is not None:
            apply_tp_vision(model.vision.layers, mesh["tp"])
        apply_tp_decoder(model.decoder.layers, mesh["tp"], model.args.decoder.qk_norm)
        apply_tp_embeddings_and_head(model.decoder, mesh["tp"])
    vision_units = vision_fsdp_units(model.vision) if model.vision is not None else []
    return checkpoint_compile_shard(model, block_groups, [*vision_units, *model.decoder.layers.values()],
                                    parallel_dims, mesh, compile_cfg, ac_cfg, param_dtype)


def checkpoint_compile_shard(model: nn.Module, block_groups: list[nn.ModuleDict], fsdp_units: list[nn.Module],
                             parallel_dims: ParallelDims, mesh: DeviceMesh | None, compile_cfg: Compile,
                             ac_cfg: ActivationCheckpoint, param_dtype: torch.dtype) -> nn.Module:
    """The order's last three steps: activation checkpointing and compile of every block of
    ``block_groups``, then FSDP2 with ``fsdp_units`` each a unit of its own (the rest with the root)."""
    for blocks in block_groups:
        apply_activation_checkpointing(blocks, ac_cfg)
    if compile_cfg.enable:
        for blocks in block_groups:
            apply_compile(blocks)
    if parallel_dims.fsdp_enabled:
        apply_fsdp(fsdp_units, model, fsdp_mesh(mesh, parallel_dims.dp_replicate), param_dtype)
    return model
