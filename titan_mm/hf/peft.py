"""LoRA adapters as an HF PEFT folder: adapter_config.json + adapter_model.safetensors, loadable with
``PeftModel.from_pretrained(<the HF base model>, folder)`` (docs/lora.md).

Names: each adapted layer's weight is renamed to HF by the family's adapter, then to the module
name transformers gives it in memory (``HFAdapter.hf_module_prefixes``), which is what PEFT keys
are matched against: ``base_model.model.<HF module>.lora_A.weight``. A module trained in full
(lora.modules_to_save) is written as PEFT saves its trained copy, ``base_model.model.<HF
module>.<parameter>``, and named in the config's ``modules_to_save`` by its whole HF path (PEFT
matches those names as suffixes of the loaded model's module names).

Fused HF layers: where HF fuses several of our layers into one (Qwen-VL's ViT qkv = our q, k and
v projections stacked by rows), n adapters of rank r become one adapter of rank n*r on the fused
layer: A = [A_q; A_k; A_v] and B = blockdiag(B_q, B_k, B_v), so that B A = blockdiag(B_i A_i)
stacked by rows exactly; alpha is scaled by n so alpha / rank is unchanged (``rank_pattern`` and
``alpha_pattern`` of the config). Such layers must have adapters on all their parts or none.
"""

import json
import os
import re

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import get_model_state_dict
from torch.distributed.tensor import DTensor

from titan_mm.hf.adapter import HFAdapter
from titan_mm.models.lora import LoRALinear, lora_layers


def save_peft_adapter(model: torch.nn.Module, adapter: HFAdapter, folder: str,
                      modules_to_save: list[str] | None = None):
    """The adapters and the modules ``modules_to_save`` (lora.modules_to_save, as apply_lora
    resolved them). Every rank joins the gather; rank 0 writes."""
    loras = lora_layers(model)
    if not loras:
        raise ValueError("the model has no LoRA adapters to export; set lora.enabled = true")
    weights = {name: (full_cpu(m.lora_A.weight), full_cpu(m.lora_B.weight)) for name, m in loras.items()}
    prefixes = tuple(f"{name}." for name in modules_to_save or [])
    trained = {k: full_cpu(v) for k, v in get_model_state_dict(model).items() if k.startswith(prefixes)}
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    tensors, config = peft_adapter(loras, weights, adapter)
    if modules_to_save:
        saved_tensors, config["modules_to_save"] = peft_modules_to_save(modules_to_save, trained, adapter)
        tensors.update(saved_tensors)
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)


def peft_adapter(loras: dict[str, LoRALinear], weights: dict[str, tuple[torch.Tensor, torch.Tensor]],
                 adapter: HFAdapter) -> tuple[dict[str, torch.Tensor], dict]:
    """(adapter_model.safetensors tensors, adapter_config.json) of the adapters ``weights`` (full
    tensors: {our module name: (A, B)}) of the layers ``loras``."""
    (rank, scaling, dropout), *others = {(m.lora_A.weight.shape[0], m.scaling, _dropout_p(m)) for m in loras.values()}
    if others:
        raise ValueError("the adapters differ in rank, alpha or dropout; a PEFT config holds one of each")
    base_keys = {f"{name}.weight": name for name in loras}
    # {HF key: our module names}: one for a layer HF keeps as it is, several (in HF's order) for a fused one
    groups = {hf_key: [base_keys[k]] for hf_key, k in adapter.rename_to_hf({k: k for k in base_keys}).items()}
    for hf_key, parts in adapter.fused_parts(dict.fromkeys(base_keys)).items():
        if None in parts:
            adapted = [base_keys[k] for k in parts if k is not None]
            raise ValueError(f"HF fuses {adapted} with layers that have no adapter into {hf_key}; a PEFT export "
                             f"needs adapters on all of its parts or none (adjust lora.target_modules)")
        groups[hf_key] = [base_keys[k] for k in parts]
    tensors, rank_pattern, alpha_pattern = {}, {}, {}
    for hf_key, names in sorted(groups.items()):
        module = hf_module_name(adapter, hf_key.removesuffix(".weight"))
        a = torch.cat([weights[n][0] for n in names])
        b = torch.block_diag(*[weights[n][1] for n in names])
        tensors[f"base_model.model.{module}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = b.contiguous()
        if len(names) > 1:
            rank_pattern[re.escape(module)] = rank * len(names)
            alpha_pattern[re.escape(module)] = scaling * rank * len(names)
    modules = sorted(k.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                     for k in tensors if k.endswith(".lora_A.weight"))
    config = {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "inference_mode": True,
              "r": rank, "lora_alpha": scaling * rank, "lora_dropout": dropout, "target_modules": modules,
              "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "use_rslora": False,
              "use_dora": False, "modules_to_save": None, "rank_pattern": rank_pattern,
              "alpha_pattern": alpha_pattern}
    return tensors, config


def peft_modules_to_save(modules: list[str], state_dict: dict[str, torch.Tensor],
                         adapter: HFAdapter) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(adapter_model.safetensors tensors, adapter_config.json's modules_to_save) of the fully
    trained ``modules`` (our names; ``state_dict`` holds their full tensors). Each one's HF module is
    the common parent of its tensors' HF names."""
    tensors, hf_modules = {}, []
    for name in modules:
        ours = {k: v for k, v in state_dict.items() if k.startswith(f"{name}.")}
        if any(None in parts for parts in adapter.fused_parts(ours).values()):
            raise ValueError(f"HF fuses layers of lora.modules_to_save's {name!r} with layers outside it; a PEFT "
                             f"export needs the whole fused HF module in modules_to_save")
        hf = {hf_module_name(adapter, k): v for k, v in adapter.to_hf(ours).items()}
        module = ".".join(os.path.commonprefix([k.split(".")[:-1] for k in hf]))
        if not module:
            raise ValueError(f"HF spreads lora.modules_to_save's {name!r} over modules with no common parent "
                             f"({sorted(hf)[:3]} ...); name its parts in lora.modules_to_save instead")
        tensors.update({f"base_model.model.{k}": v.contiguous() for k, v in hf.items()})
        hf_modules.append(module)
    return tensors, hf_modules


def hf_module_name(adapter: HFAdapter, checkpoint_name: str) -> str:
    """A module's name in a transformers model (what PEFT keys name) from its checkpoint name."""
    for ours, in_memory in adapter.hf_module_prefixes:
        if checkpoint_name.startswith(ours):
            return in_memory + checkpoint_name[len(ours):]
    return checkpoint_name


def full_cpu(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on the CPU (a collective for a DTensor: every rank calls it)."""
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu()


def _dropout_p(m: LoRALinear) -> float:
    return m.lora_dropout.p if isinstance(m.lora_dropout, torch.nn.Dropout) else 0.0
