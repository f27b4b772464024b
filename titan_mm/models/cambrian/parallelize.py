"""How the Cambrian family is parallelized, in the shared vision-language order: sequence
parallelism (the encoders' images split over the CP / Ulysses group, their outputs all-gathered),
tensor parallelism (each encoder's plan, the decoder's), activation checkpointing and compile of
every block group (each encoder's blocks, the aggregator layers, the SVA layers inside the
decoder, the decoder blocks), then FSDP2 with each of those blocks a unit of its own.

The SVA layers run on the whole stream between decoder blocks, which tensor parallelism leaves
whole on every rank, so they stay replicated single-device code, like LLaVA's projector.
"""

import torch
from torch.distributed.device_mesh import DeviceMesh

from titan_mm.config import ActivationCheckpoint, Compile
from titan_mm.models.cambrian.encoders import ENCODERS
from titan_mm.models.cambrian.model import CambrianArgs, CambrianModel
from titan_mm.models.llama.parallelize import tensor_parallel_sizes as decoder_tensor_parallel_sizes
from titan_mm.parallel.parallel_dims import ParallelDims
from titan_mm.parallel.sequence import apply_sequence_parallel
from titan_mm.parallel.tensor_parallel import apply_tp_decoder, apply_tp_embeddings_and_head
from titan_mm.parallel.vision_language import checkpoint_compile_shard


def parallelize_cambrian(model: CambrianModel, parallel_dims: ParallelDims, mesh: DeviceMesh | None,
                         compile_cfg: Compile, ac_cfg: ActivationCheckpoint, param_dtype: torch.dtype):
    apply_sequence_parallel(model, mesh, parallel_dims)
    vision, args = model.vision, model.args
    block_groups = [model.decoder.layers]
    if vision is not None:  # the first pipeline stage, or no pipeline
        block_groups = [*(enc.layers for enc in vision.encoders.values()), vision.layers, model.decoder_sva,
                        model.decoder.layers]
        block_groups = [blocks for blocks in block_groups if blocks is not None]
    if parallel_dims.tp_enabled:
        if vision is not None:
            for k, encoder in vision.encoders.items():
                ENCODERS[args.encoders[int(k)].kind].apply_tp(encoder, mesh["tp"])
        apply_tp_decoder(model.decoder.layers, mesh["tp"], args.decoder.qk_norm)
        apply_tp_embeddings_and_head(model.decoder, mesh["tp"])
    units = [block for blocks in block_groups for block in blocks.values()]
    return checkpoint_compile_shard(model, block_groups, units, parallel_dims, mesh, compile_cfg, ac_cfg,
                                    param_dtype)


def tensor_parallel_sizes(args: CambrianArgs, cfg) -> dict[str, int]:
    """The decoder's, plus every encoder's heads and MLP units."""
    sizes = decoder_tensor_parallel_sizes(args, cfg)
    for k, e in enumerate(args.encoders):
        for name, size in ENCODERS[e.kind].tensor_parallel_sizes(e.vision).items():
            sizes[f"encoder {k} {name}"] = size
    return sizes


def pipeline_first_stage_layers(args: CambrianArgs) -> int:
    """The SVA layers inside the decoder read the encoders' windows, which live on the first
    pipeline stage: every decoder layer they follow must be there too."""
    return max(args.decoder_sva_layers, default=0) + 1
