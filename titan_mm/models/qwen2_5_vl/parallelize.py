"""How Qwen2.5-VL is parallelized: the shared vision-language order
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
    # the merger's (4 * vision dim)^2 weight is large enough to gather on its own
    return [*vision.layers.values(), vision.merger]


def apply_tp_vision(blocks: nn.ModuleDict, tp_mesh: DeviceMesh):
    """ViT blocks, window and full attention alike: forward(x_NLD, cos, sin, frame_mask, window_mask).

    Sequence parallelism splits the patch axis L for the RMSNorms; attention (q/k/v by heads) and
    the SwiGLU MLP (by hidden units) run on all L patches. The merger stays replicated.
    """
    plan = qwen_vit_block_plan({"mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(),
                                "mlp.down_proj": RowwiseParallel(output_layouts=Shard(1))})
    for block in blocks.values():
        parallelize_block(block, tp_mesh, plan, n_extra_inputs=4)


parallelize_qwen2_5_vl = functools.partial(parallelize_vision_language, apply_tp_vision=apply_tp_vision,
                                           vision_fsdp_units=vision_fsdp_units)
