"""What each parameter is, for the optimizer: its module group (vision / projector / decoder), whether
it is weight-decayed, and whether it is a block matrix that Muon orthogonalises.

Decided by module type, never by name pattern: the ``weight`` of a family's matrix modules (Linear,
a patch embedding held in Conv3d's shape) is decayed; norms, biases, token embeddings and position
tables (nn.Embedding or a bare Parameter) are not. Freezing sets ``requires_grad = False`` on the
model built on the meta device, before any parallelism: FSDP2 then keeps no gradient for those
parameters, and the optimizer never sees them.
"""

from dataclasses import dataclass

from torch import nn

from titan_mm.config import ConfigError
from titan_mm.models import ParamPolicy
from titan_mm.models.lora import AdapterMatrix

BLOCKS = "layers"
"""The ModuleDict of transformer blocks, in the vision encoder and in the decoder."""


@dataclass
class ParamInfo:
    name: str
    param: nn.Parameter
    group: str
    """Module group of the family policy ("" when no group covers the name)."""
    decays: bool
    """A weight matrix (or a LoRA factor): weight decay applies."""
    block_matrix: bool
    """A weight matrix inside a transformer block of the vision encoder or decoder (Muon's)."""


def module_group(name: str, policy: ParamPolicy) -> str:
    """The group whose longest prefix matches the dotted ``name`` ("" when none does)."""
    best, best_len = "", -1
    for group, prefixes in policy.module_groups.items():
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = group, len(prefix)
    return best


def describe_parameters(model: nn.Module, policy: ParamPolicy) -> list[ParamInfo]:
    """Every parameter that trains (requires_grad), in model order."""
    infos = []
    for module_name, module in model.named_modules():
        is_matrix_module = isinstance(module, policy.matrix_modules)
        # a LoRA factor is a weight matrix too (decayed, as HF Trainer does), but low rank: AdamW's
        is_adapter = isinstance(module, AdapterMatrix)
        for pname, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            name = f"{module_name}.{pname}" if module_name else pname
            decays = (is_matrix_module or is_adapter) and pname == "weight"
            group = module_group(name, policy)
            in_block = f".{BLOCKS}." in f".{name}"
            infos.append(ParamInfo(name, param, group, decays,
                                   block_matrix=decays and not is_adapter and param.ndim == 2 and in_block
                                   and group in ("vision", "decoder")))
    return infos


def check_module_groups(names: list[str], policy: ParamPolicy, key: str):
    """Every name is a module group of the family."""
    unknown = [n for n in names if n not in policy.module_groups]
    if unknown:
        raise ConfigError(f"{key} names {unknown}, which this model family does not have; its module groups "
                          f"are {sorted(policy.module_groups)}")


def freeze_module_groups(model: nn.Module, groups: list[str], policy: ParamPolicy) -> int:
    """requires_grad = False on every parameter of ``groups``; returns how many elements were frozen."""
    frozen = 0
    for name, param in model.named_parameters():
        if module_group(name, policy) in groups:
            param.requires_grad_(False)
            frozen += param.numel()
    return frozen

