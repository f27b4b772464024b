"""Tensor parallelism for CLIP's vision tower, for the families that embed it.

Megatron-style, without sequence parallelism: heads and MLP units are split over the tp ranks
(colwise q/k/v and fc1, rowwise out_proj and fc2, whose outputs are all-reduced); the residual
stream and the norms stay whole on every rank. Splitting the patch axis as the SigLIP2 plan does
would need the token count (577 at 336 x 336: 576 patches and the class token) to divide by the
degree. The embeddings and pre_layrnorm run replicated too: identical inputs give identical
gradients there, which need no reduction. Activation checkpointing, compile and FSDP take
``encoder.layers`` as they take any ViT's blocks (titan_mm/parallel/vision_language.py).
"""

from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from titan_mm.models.clip.model import CLIPVisionArgs, CLIPVisionEncoder

PLAN = {
    "self_attn.q_proj": ColwiseParallel(),
    "self_attn.k_proj": ColwiseParallel(),
    "self_attn.v_proj": ColwiseParallel(),
    "self_attn.out_proj": RowwiseParallel(),
    "mlp.fc1": ColwiseParallel(),
    "mlp.fc2": RowwiseParallel(),
}


def apply_tp_clip(encoder: CLIPVisionEncoder, tp_mesh: DeviceMesh):
    for block in encoder.layers.values():
        parallelize_module(block, tp_mesh, PLAN)


def clip_tensor_parallel_sizes(args: CLIPVisionArgs) -> dict[str, int]:
    """What apply_tp_clip splits, each of which must divide by the tp degree."""
    return {"clip n_heads": args.n_heads, "clip ffn_hidden_dim": args.ffn_hidden_dim}
