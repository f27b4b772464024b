"""The optimizer of a model part: AdamW, or Muon for block matrices with AdamW for the rest
(docs/optimizers.md). Parameter groups come from the family's policy (train/param_groups.py): the
learning rate of each module group, weight decay by module type, Muon or not; frozen parameters
(requires_grad = False) are left out."""

import torch
from torch import nn

from titan_mm.config import ConfigError
from titan_mm.config import Optimizer as OptimizerConfig
from titan_mm.models import ParamPolicy
from titan_mm.parallel.common import group_by_mesh
from titan_mm.train.muon import Muon
from titan_mm.train.param_groups import ParamInfo, describe_parameters

NS_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def build_optimizer(cfg: OptimizerConfig, model: nn.Module, device: torch.device, capturable: bool = False,
                    policy: ParamPolicy = ParamPolicy()) -> torch.optim.Optimizer:
    """capturable (AdamW only): the step may be captured in a CUDA graph; the lr is then a device
    tensor that the LR schedule fills in place."""
    infos = describe_parameters(model, policy)
    if not infos:
        raise ConfigError("training.freeze leaves no trainable parameter in this model part; freeze fewer "
                          "module groups")
    # auto = fused on every device: its found_inf input drops a non-finite step (train/nonfinite.py)
    impl = "fused" if cfg.implementation == "auto" else cfg.implementation
    kernels = {"fused": impl == "fused", "foreach": impl == "foreach"}
    if cfg.name == "muon":
        return Muon(param_groups(cfg, infos, muon=True), lr=cfg.lr, momentum=cfg.muon_momentum,
                    nesterov=cfg.muon_nesterov, ns_steps=cfg.muon_ns_steps, ns_dtype=NS_DTYPES[cfg.muon_ns_dtype],
                    betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **kernels)
    groups = param_groups(cfg, infos, muon=False)
    if capturable:
        for group in groups:
            # the schedule's base: a number, so computing each step's lr needs no device read
            group["initial_lr"] = group["lr"]
            group["lr"] = torch.tensor(group["lr"], device=device)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             capturable=capturable, **kernels)


def param_groups(cfg: OptimizerConfig, infos: list[ParamInfo], muon: bool) -> list[dict]:
    """One group per (learning rate, weight decay, Muon or not), split by DTensor mesh: foreach and
    fused kernels reject lists that mix meshes or DTensors with plain tensors (tensor-parallel blocks
    beside replicated layers)."""
    keyed: dict[tuple, list] = {}
    for info in infos:
        lr = cfg.lr * cfg.lr_multipliers.get(info.group, 1.0)
        keyed.setdefault((lr, info.decays, muon and info.block_matrix), []).append(info.param)
    groups = []
    for (lr, decays, use_muon), params in keyed.items():
        for same_mesh in group_by_mesh(params):
            group = {"params": same_mesh, "lr": lr, "weight_decay": cfg.weight_decay if decays else 0.0}
            groups.append({**group, "use_muon": use_muon} if muon else group)
    return groups

