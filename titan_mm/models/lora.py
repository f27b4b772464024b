"""LoRA: low-rank adapters on selected Linear layers of any family's model, applied from outside the
model code (docs/lora.md).

``apply_lora`` swaps each selected ``nn.Linear`` for a ``LoRALinear`` that keeps the same
``weight`` and ``bias`` parameters (same names, so checkpoints and HF adapters see the base model)
and adds ``lora_A`` (r x in) and ``lora_B`` (out x r): y = x W^T + b + (alpha / r) B A dropout(x).
It runs on the meta model, before parallelization, so tensor parallelism shards the adapters with
their base layer (titan_mm/parallel/tensor_parallel.py) and FSDP shards them with their block.
Modules named by ``modules_to_save`` (e.g. the projector) stay unfrozen and train in full.
"""

import fnmatch
import math
from typing import Callable

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


def apply_lora(model: nn.Module, cfg: LoraConfig) -> tuple[list[str], list[str]]:
    """Freeze every parameter of ``model``, give the Linear layers that ``cfg.target_modules`` select
    a trainable adapter, and unfreeze the modules that ``cfg.modules_to_save`` select. Returns the
    adapted layers' names and the fully trained modules' names."""
    if not cfg.target_modules:
        raise ConfigError("lora.enabled = true but lora.target_modules is empty: name the Linear layers to adapt")
    linears = [name for name, m in model.named_modules() if type(m) is nn.Linear]
    targets = matching_names(linears, cfg.target_modules, "lora.target_modules", "Linear layer")
    unreachable = [name for name in targets if name in UNREACHABLE_LINEARS]
    if unreachable:
        raise ConfigError(f"lora.target_modules selects {unreachable}, whose weight the objective reads without "
                          f"calling the layer (an adapter there would never run); leave it out")
    saved = modules_to_save(model, cfg.modules_to_save, targets)
    model.requires_grad_(False)
    for name in targets:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, child, LoRALinear(getattr(owner, child), cfg.rank, cfg.alpha, cfg.dropout))
    for name in saved:
        model.get_submodule(name).requires_grad_(True)
    return sorted(targets), saved


def matching_names(names: list[str], patterns: list[str], key: str, kind: str) -> list[str]:
    """The ``names`` that any of ``patterns`` match, in pattern order; a pattern matching none is an error."""
    matched = []
    for pattern in patterns:
        hits = [name for name in names if fnmatch.fnmatchcase(name, pattern)]
        if not hits:
            raise ConfigError(f"{key} pattern {pattern!r} matches no {kind} of the model; "
                              f"its {kind}s are named like {names[:4]} ...")
        matched += [name for name in hits if name not in matched]
    return matched


def modules_to_save(model: nn.Module, patterns: list[str], targets: list[str]) -> list[str]:
    """The outermost modules that ``patterns`` (lora.modules_to_save) match, none holding a LoRA
    target: a layer trains either in full or through an adapter."""
    names = [name for name, _ in model.named_modules() if name]
    matched = matching_names(names, patterns, "lora.modules_to_save", "module")
    outermost = sorted(m for m in matched if not any(m.startswith(f"{other}.") for other in matched))
    for name in outermost:
        adapted = [t for t in targets if t == name or t.startswith(f"{name}.")]
        if adapted:
            raise ConfigError(f"lora.modules_to_save selects {name!r}, which holds the LoRA targets {adapted}; "
                              f"a layer trains either in full or through an adapter: drop it from "
                              f"lora.target_modules or from lora.modules_to_save")
    return outermost


def init_adapters(model: nn.Module):
    """Initialise every adapter of ``model`` (after its init_weights; a no-op without LoRA)."""
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.init_adapter()


def is_adapter_key(name: str) -> bool:
    """Whether a state-dict key is an adapter weight (``....lora_A.weight`` / ``....lora_B.weight``)."""
    parts = name.split(".")
    return len(parts) >= 3 and parts[-2] in ADAPTER_PARTS


def trained_under_lora(saved_modules: list[str]) -> Callable[[str], bool]:
    """The test "this state-dict key trains under LoRA": an adapter, or a parameter of one of
    ``saved_modules`` (lora.modules_to_save). What an adapters-only checkpoint holds."""
    prefixes = tuple(f"{name}." for name in saved_modules)
    return lambda name: is_adapter_key(name) or name.startswith(prefixes)


WRAPPER_PARTS = ("_checkpoint_wrapped_module", "_orig_mod")
"""Module-name parts that activation checkpointing's and torch.compile's wrappers insert; state-dict
keys (get_model_state_dict) leave them out."""


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every adapted layer of ``model`` by its state-dict name (wrappers' name parts left out)."""
    return {".".join(p for p in name.split(".") if p not in WRAPPER_PARTS): m
            for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def adapter_scalings(model: nn.Module) -> dict[str, float]:
    """{module name: alpha / rank} of every adapter."""
    return {name: m.scaling for name, m in lora_layers(model).items()}


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
