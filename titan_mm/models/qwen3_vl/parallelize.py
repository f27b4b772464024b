"""How Qwen3-VL is parallelized: the shared vision-language order
(titan_mm/parallel/vision_language.py) with this family's ViT plan and FSDP units."""

import functools

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

from titan_mm.parallel.tensor_parallel import parallelize_block, qwen_vit_block_plan
from titan_mm.parallel.vision_language import parallelize_vision_language


def vision_fsdp_units(vision) -> list:
    """The ViT blocks and mergers, each an FSDP unit of its own."""
    # each merger holds two (4 * vision dim)^2-sized weights: large enough to gather on its own
    return [*vision.layers.values(), vision.merger, *vision.deepstack_mergers.values()]


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


parallelize_qwen3_vl = functools.partial(parallelize_vision_language, apply_tp_vision=apply_tp_vision,
                                         vision_fsdp_units=vision_fsdp_units)
