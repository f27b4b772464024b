"""Pipeline parallelism (torch.distributed.pipelining): the model cut into stages of decoder layers.

Every rank builds the whole model on the meta device and keeps only its own stages. A stage module is
the family's model class with the pieces of other stages set to None:

- stage s keeps decoder layers ``layers[s]``; ``decoder.layers`` is a ModuleDict keyed by the
  original layer index, so parameter names, and so DCP checkpoints, do not depend on the layout;
- the first stage also keeps the token embeddings and everything outside the decoder (vision
  encoder, projector): images are embedded and scattered into the token sequence there;
- the last stage keeps the final norm and the output head, and its output goes to the loss.

Only the hidden states [B, S, D] travel between stages. Position ids (M-RoPE [B, 3, S] included) and
document ids reach every stage as keyword arguments of ``schedule.step`` (the schedule passes
keyword arguments to every stage, and every pipeline rank reads the same batches); the media
(pixel_values, grid_thw, image_token_index) go only to the ranks that hold the first stage.

Under context parallelism or Ulysses the batch is sharded along the sequence first, then the schedule
cuts the shard into microbatches along the rows: every stage sees [B / M, S / sp] tokens (the stage's
shape inference runs a real forward, so it finds that shape), the first stage splits each
microbatch's image slots over the sequence-parallel group, and the last stage's loss covers its shard.
"""

import copy

import torch
from torch import nn
from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleGPipe,
                                          ScheduleInterleaved1F1B)

from titan_mm.config import Parallelism
from titan_mm.parallel.parallel_dims import ParallelismError

SINGLE_STAGE_SCHEDULES = {"1F1B": Schedule1F1B, "GPipe": ScheduleGPipe}
MULTI_STAGE_SCHEDULES = {"Interleaved1F1B": ScheduleInterleaved1F1B}


def pipeline_microbatches(p: Parallelism, local_batch_size: int) -> int:
    return local_batch_size if p.pipeline_parallel_microbatches == -1 else p.pipeline_parallel_microbatches


def check_pipeline(p: Parallelism, local_batch_size: int, decoder_args, first_stage_layers: int) -> list[range]:
    """Validate the pipeline settings (before anything is built); return each stage's decoder layers.

    ``first_stage_layers``: how many leading decoder layers the first stage must hold (Qwen3-VL
    adds DeepStack vision features after its first layers; 1 otherwise).
    """
    pp, per_rank, schedule = p.pipeline_parallel_degree, p.pipeline_parallel_stages_per_rank, p.pipeline_parallel_schedule
    if schedule in SINGLE_STAGE_SCHEDULES and per_rank != 1:
        raise ParallelismError(f"pipeline_parallel_schedule = {schedule} holds one stage per rank; set "
                               f"pipeline_parallel_stages_per_rank = 1, or use Interleaved1F1B")
    if schedule in MULTI_STAGE_SCHEDULES and per_rank < 2:
        raise ParallelismError(f"pipeline_parallel_schedule = {schedule} needs pipeline_parallel_stages_per_rank "
                               f">= 2, got {per_rank}; raise it or use 1F1B")
    if decoder_args.tie_embeddings:
        raise ParallelismError(
            "this flavor ties the output head to the token embeddings, which live on the first pipeline "
            "stage while the head lives on the last; choose a flavor with tie_embeddings = False (e.g. "
            "debug-untied) or set pipeline_parallel_degree = 1")
    n_mb = pipeline_microbatches(p, local_batch_size)
    if local_batch_size % n_mb:
        raise ParallelismError(f"pipeline_parallel_microbatches = {n_mb} does not divide "
                               f"training.local_batch_size = {local_batch_size}; choose a divisor of it")
    if schedule == "1F1B" and n_mb < pp:
        raise ParallelismError(f"1F1B needs at least pipeline_parallel_degree = {pp} microbatches, got {n_mb}; "
                               f"raise training.local_batch_size and pipeline_parallel_microbatches to "
                               f">= {pp}, or use GPipe")
    if schedule in MULTI_STAGE_SCHEDULES and n_mb % pp:
        raise ParallelismError(f"{schedule} needs a multiple of pipeline_parallel_degree = {pp} microbatches, "
                               f"got {n_mb}; change training.local_batch_size / pipeline_parallel_microbatches")
    layers = stage_layers(decoder_args.n_layers, pp * per_rank, p.pipeline_parallel_split_points)
    if len(layers[0]) < first_stage_layers:
        raise ParallelismError(
            f"the first pipeline stage holds decoder layers {list(layers[0])} but this model adds vision "
            f"features after layers 0-{first_stage_layers - 1}, which must be on it; set "
            f"pipeline_parallel_split_points to start at >= {first_stage_layers}")
    return layers


def stage_layers(n_layers: int, n_stages: int, split_points: list[int]) -> list[range]:
    """Decoder layers of each stage: cut at ``split_points``, or evenly with the remainder going to the
    later stages (the first also runs the vision encoder)."""
    if n_stages > n_layers:
        raise ParallelismError(f"{n_stages} pipeline stages (pipeline_parallel_degree x stages_per_rank) but "
                               f"the decoder has {n_layers} layers; use at most {n_layers} stages")
    if split_points:
        if len(split_points) != n_stages - 1:
            raise ParallelismError(f"pipeline_parallel_split_points = {split_points} must list {n_stages - 1} "
                                   f"layer indices for {n_stages} stages")
        bounds = [0, *split_points, n_layers]
        if any(a >= b for a, b in zip(bounds, bounds[1:])):
            raise ParallelismError(f"pipeline_parallel_split_points = {split_points} must increase strictly "
                                   f"within 1..{n_layers - 1} (each stage needs a layer)")
    else:
        base, extra = divmod(n_layers, n_stages)
        sizes = [base + (s >= n_stages - extra) for s in range(n_stages)]
        bounds = [sum(sizes[:s]) for s in range(n_stages + 1)]
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def stage_indices(pp_rank: int, pp: int, stages_per_rank: int) -> list[int]:
    """Stages held by pipeline rank ``pp_rank``: r, r + pp, r + 2 pp, ... (looping placement)."""
    return [pp_rank + k * pp for k in range(stages_per_rank)]


def split_stage(model: nn.Module, stage: int, layers: range, n_stages: int) -> nn.Module:
    """A copy of ``model`` (on the meta device) holding only ``stage``'s pieces."""
    module = copy.deepcopy(model)
    decoder = module.decoder
    for name in list(decoder.layers.keys()):
        if int(name) not in layers:
            del decoder.layers[name]
    if stage > 0:
        decoder.tok_embeddings = None
        # everything outside the decoder (vision encoder, projector) feeds the first stage
        for name, _ in list(module.named_children()):
            if name != "decoder":
                setattr(module, name, None)
    if stage < n_stages - 1:
        decoder.norm = None
        decoder.output = None
    return module


def build_pipeline_schedule(p: Parallelism, modules: list[nn.Module], indices: list[int], n_stages: int,
                            local_batch_size: int, device: torch.device, pp_group, loss_fn):
    """The schedule over this rank's stage modules. Gradients are not scaled by the number of
    microbatches: loss_fn already divides by the label tokens of the whole global batch."""
    stages = [PipelineStage(m, i, n_stages, device, group=pp_group) for m, i in zip(modules, indices)]
    n_mb = pipeline_microbatches(p, local_batch_size)
    name = p.pipeline_parallel_schedule
    if name in SINGLE_STAGE_SCHEDULES:
        return SINGLE_STAGE_SCHEDULES[name](stages[0], n_mb, loss_fn=loss_fn, scale_grads=False)
    return MULTI_STAGE_SCHEDULES[name](stages, n_mb, loss_fn=loss_fn, scale_grads=False)


def microbatch_image_token_index(index_BS: torch.Tensor, n_microbatches: int, slots_per_row: int) -> torch.Tensor:
    """image_token_index counts merged-patch slots from the start of the local batch (row b's slots
    start at b * slots_per_row); the schedule cuts the batch into microbatches of B / M rows, each
    with only its own media, so count from the start of each row's microbatch instead. Works on a
    sequence shard too: its values still count the whole rows' slots."""
    rows = index_BS.shape[0] // n_microbatches
    first_row_B1 = (torch.arange(index_BS.shape[0], device=index_BS.device) // rows * rows)[:, None]
    return torch.where(index_BS >= 0, index_BS - first_row_B1 * slots_per_row, index_BS)
