"""AdamW with decoupled weight decay on matrices only."""

import torch
from torch import nn

from titan_mm.config import Optimizer as OptimizerConfig


def _decays(name: str, param: nn.Parameter) -> bool:
    """Weight decay for matrices; not for norms, biases, token or position embeddings."""
    return param.ndim >= 2 and not name.endswith(("tok_embeddings.weight", "pos_embed"))


def build_optimizer(cfg: OptimizerConfig, model: nn.Module, device_type: str) -> torch.optim.Optimizer:
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in params if _decays(n, p)], "weight_decay": cfg.weight_decay},
        {"params": [p for n, p in params if not _decays(n, p)], "weight_decay": 0.0},
    ]
    impl = cfg.implementation
    if impl == "auto":
        impl = "fused" if device_type == "cuda" else "foreach"
    kwargs = {"fused": impl == "fused", "foreach": impl == "foreach"}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **kwargs)
