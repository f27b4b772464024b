"""AdamW with decoupled weight decay on matrices only."""

import torch
from torch import nn

from titan_mm.config import Optimizer as OptimizerConfig
from titan_mm.parallel.common import group_by_mesh


def _decays(name: str, param: nn.Parameter) -> bool:
    """Weight decay for matrices; not for norms, biases, token or position embeddings."""
    return param.ndim >= 2 and not name.endswith(("tok_embeddings.weight", "pos_embed"))


def build_optimizer(cfg: OptimizerConfig, model: nn.Module, device: torch.device,
                    capturable: bool = False) -> torch.optim.Optimizer:
    """capturable: the step may be captured in a CUDA graph; the lr is then a device tensor that the
    LR schedule fills in place."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    # one group per DTensor mesh as well: foreach / fused kernels reject lists that mix meshes or
    # DTensors with plain tensors (tensor-parallel blocks beside replicated layers)
    groups = [{"params": same_mesh, "weight_decay": cfg.weight_decay if decays else 0.0}
              for decays in (True, False)
              for same_mesh in group_by_mesh([p for n, p in params if _decays(n, p) == decays])]
    # auto = fused on every device: its found_inf input drops a non-finite step (train/nonfinite.py)
    impl = "fused" if cfg.implementation == "auto" else cfg.implementation
    kwargs = {"fused": impl == "fused", "foreach": impl == "foreach"}
    lr = torch.tensor(cfg.lr, device=device) if capturable else cfg.lr
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                  capturable=capturable, **kwargs)
    if capturable:
        for group in optimizer.param_groups:
            # the schedule's base: a number, so computing each step's lr needs no device read
            group["initial_lr"] = cfg.lr
    return optimizer
