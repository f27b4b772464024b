"""AdamW with decoupled weight decay on matrices only."""

import torch
from torch import nn

from titan_mm.config import Optimizer as OptimizerConfig
from titan_mm.parallel.common import group_by_mesh


def _decays(name: str, param: nn.Parameter) -> bool:
    """Weight decay for matrices; not for norms, biases, token or position embeddings."""
    return param.ndim >= 2 and not name.endswith(("tok_embeddings.weight", "pos_embed"))


def build_optimizer(cfg: OptimizerConfig, model: nn.Module, device_type: str) -> torch.optim.Optimizer:
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    # one group per DTensor mesh as well: foreach / fused kernels reject lists that mix meshes or
    # DTensors with plain tensors (tensor-parallel blocks beside replicated layers)
    groups = [{"params": same_mesh, "weight_decay": cfg.weight_decay if decays else 0.0}
              for decays in (True, False)
              for same_mesh in group_by_mesh([p for n, p in params if _decays(n, p) == decays])]
    impl = cfg.implementation
    if impl == "auto":
        impl = "fused" if device_type == "cuda" else "foreach"
    kwargs = {"fused": impl == "fused", "foreach": impl == "foreach"}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **kwargs)
