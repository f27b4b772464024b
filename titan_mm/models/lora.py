"""LoRA: low-rank adapters on selected Linear layers of any family's model, applied from outside the
model code (docs/lora.md).

``apply_lora`` swaps each selected ``nn.Linear`` for a ``LoRALinear`` that keeps the same
``weight`` and ``bias`` parameters (same names, so checkpoints and HF adapters see the base model)
and adds ``lora_A`` (r x in) and ``lora_B`` (out x r): y = x W^T + b + (alpha / r) B A dropout(x).
It runs on the meta model, before parallelization, so tensor parallelism shards the adapters with
their base layer (titan_mm/parallel/tensor_parallel.py) and FSDP shards them with their block.
"""

import fnmatch
import math

import torch
from torch import nn
from torch.nn import functional as F

from titan_mm.config import ConfigError
from titan_mm.config import Lora as LoraConfig

ADAPTER_PARTS = ("lora_A", "lora_B")

UNREACHABLE_LINEARS = ("decoder.output",)
"""Linear layers whose weight is read directly (the objective applies the output head with
F.linear on its weight): an adapter there would never run."""


class AdapterMatrix(nn.Module):
    """One LoRA factor, a bias-free linear map; not an nn.Linear, so that the families' init loops
    over their Linear layers leave it alone."""

    def __init__(self, in_features: int, out_features: int, device: torch.device, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class LoRALinear(nn.Linear):
    """A Linear layer plus a low-rank update; at init (B = 0) it computes exactly the base layer."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias
        self.lora_A = AdapterMatrix(base.in_features, rank, base.weight.device, base.weight.dtype)
        self.lora_B = AdapterMatrix(rank, base.out_features, base.weight.device, base.weight.dtype)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def init_adapter(self):
        """PEFT's init: A kaiming-uniform (as nn.Linear's default), B zero."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)


def apply_lora(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Freeze every parameter of ``model``, then give the Linear layers that ``cfg.target_modules``
    select a trainable adapter. Returns their names."""
    if not cfg.target_modules:
        raise ConfigError("lora.enabled = true but lora.target_modules is empty: name the Linear layers to adapt")
    linears = [name for name, m in model.named_modules() if type(m) is nn.Linear]
    targets = []
    for pattern in cfg.target_modules:
        matched = [name for name in linears if fnmatch.fnmatchcase(name, pattern)]
        if not matched:
            raise ConfigError(f"lora.target_modules pattern {pattern!r} matches no Linear layer of the model; "
                              f"its Linear layers are named like {linears[:4]} ...")
        targets += [name for name in matched if name not in targets]
    unreachable = [name for name in targets if name in UNREACHABLE_LINEARS]
    if unreachable:
        raise ConfigError(f"lora.target_modules selects {unreachable}, whose weight the objective reads without "
                          f"calling the layer (an adapter there would never run); leave it out")
    model.requires_grad_(False)
    for name in targets:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, child, LoRALinear(getattr(owner, child), cfg.rank, cfg.alpha, cfg.dropout))
    return sorted(targets)


def init_adapters(model: nn.Module):
    """Initialise every adapter of ``model`` (after its init_weights; a no-op without LoRA)."""
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.init_adapter()


def is_adapter_key(name: str) -> bool:
    """Whether a state-dict key is an adapter weight (``....lora_A.weight`` / ``....lora_B.weight``)."""
    parts = name.split(".")
    return len(parts) >= 3 and parts[-2] in ADAPTER_PARTS


def adapter_scalings(model: nn.Module) -> dict[str, float]:
    """{module name: alpha / rank} of every adapter."""
    return {name: m.scaling for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_adapters(state_dict: dict[str, torch.Tensor], scalings: dict[str, float]) -> dict[str, torch.Tensor]:
    """The state dict of the equivalent plain model: W + (alpha / r) B A for every adapted layer, the
    adapter keys dropped. Takes full (unsharded) tensors; the sum is formed in fp32 or better."""
    out = {k: v for k, v in state_dict.items() if not is_adapter_key(k)}
    for name, scaling in scalings.items():
        w = state_dict[f"{name}.weight"]
        dtype = torch.promote_types(w.dtype, torch.float32)
        a, b = (state_dict[f"{name}.{part}.weight"].to(dtype) for part in ADAPTER_PARTS)
        out[f"{name}.weight"] = (w.to(dtype) + scaling * (b @ a)).to(w.dtype)
    return out
