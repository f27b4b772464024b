"""Tensor parallelism for DINOv2, for the families that embed it.

Megatron-style, without sequence parallelism: heads and MLP units are split over the tp ranks
(colwise q/k/v and in-projections, rowwise out-projections, whose outputs are all-reduced); the
residual stream, the norms and the layer scales stay whole on every rank. Splitting the patch axis
would need the token count (730 at 378 x 378: 729 patches and the class token, plus any registers)
to divide by the degree. The embeddings and the final norm run replicated too: identical inputs
give identical gradients there, which need no reduction. Activation checkpointing, compile and
FSDP take ``encoder.layers`` as they take any ViT's blocks (titan_mm/parallel/vision_language.py).
"""

from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from titan_mm.models.dinov2.model import Dinov2Args, Dinov2Encoder

ATTENTION_PLAN = {
    "attn.q_proj": ColwiseParallel(),
    "attn.k_proj": ColwiseParallel(),
    "attn.v_proj": ColwiseParallel(),
    "attn.out_proj": RowwiseParallel(),
}
MLP_PLAN = {"mlp.fc1": ColwiseParallel(), "mlp.fc2": RowwiseParallel()}
SWIGLU_PLAN = {"mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(),
               "mlp.down_proj": RowwiseParallel()}


def apply_tp_dinov2(encoder: Dinov2Encoder, tp_mesh: DeviceMesh):
    plan = {**ATTENTION_PLAN, **(SWIGLU_PLAN if encoder.args.swiglu else MLP_PLAN)}
    for block in encoder.layers.values():
        parallelize_module(block, tp_mesh, plan)


def dinov2_tensor_parallel_sizes(args: Dinov2Args) -> dict[str, int]:
    """What apply_tp_dinov2 splits, each of which must divide by the tp degree."""
    return {"dinov2 n_heads": args.n_heads, "dinov2 MLP width": args.ffn_hidden_dim}
