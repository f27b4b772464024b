"""Read and write HF safetensors checkpoints through a family's HFAdapter.

Loading goes through DCP's HuggingFaceStorageReader into the model's own (possibly sharded) state
dict, so each rank reads only its shards and no second full copy is held. The exception are HF
tensors that fuse several of ours (a ViT's qkv): a rank's q, k and v shards are not one block of
them, so each rank reads them whole, splits them and keeps its shards. Export gathers
full tensors to CPU and writes sharded safetensors with model.safetensors.index.json and config.json.
"""

import json
import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, set_model_state_dict,
)

from titan_mm.hf.adapter import HFAdapter
from titan_mm.models.lora import adapter_scalings, is_adapter_key, merge_adapters


def load_hf_weights(model: torch.nn.Module, adapter: HFAdapter, folder: str):
    """The base weights (a LoRA model's adapters keep their init)."""
    state_dict = base_state_dict(model)
    hf_state_dict = adapter.rename_to_hf(state_dict)
    # fused HF tensors are read whole into CPU buffers of their full shape
    fused = {hf_key: torch.empty((sum(state_dict[k].shape[0] for k in parts), *state_dict[parts[0]].shape[1:]),
                                 dtype=state_dict[parts[0]].dtype)
             for hf_key, parts in adapter.fused_parts(state_dict).items()}
    available = hf_folder_names(folder)
    # the same tensors under the names this folder uses; DCP reads into them in place
    as_stored = {adapter.stored_name(k, available): v for k, v in {**hf_state_dict, **fused}.items()}
    dcp.load(as_stored, storage_reader=dcp.HuggingFaceStorageReader(folder))
    strict = not fused and not adapter_scalings(model)
    set_model_state_dict(model, adapter.from_hf(hf_state_dict), options=StateDictOptions(strict=strict))
    if fused:
        # full tensors: set_model_state_dict keeps each rank's shard of them
        set_model_state_dict(model, adapter.from_hf(fused),
                             options=StateDictOptions(full_state_dict=True, strict=False))


def hf_folder_names(folder: str) -> set[str]:
    """Tensor names of every safetensors file in ``folder`` (headers only)."""
    names = set()
    for file in os.listdir(folder):
        if file.endswith(".safetensors"):
            with safe_open(os.path.join(folder, file), framework="pt") as f:
                names.update(f.keys())
    return names


def save_hf_weights(model: torch.nn.Module, adapter: HFAdapter, args, folder: str,
                    max_shard_bytes: int = 5 * 2**30, dtype: torch.dtype | None = None):
    """Full weights, LoRA adapters merged into them (every rank joins the gather; rank 0 writes)."""
    config = adapter.hf_config(args)  # first: it says why a model has no HF layout
    state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    state_dict = merge_adapters(state_dict, adapter_scalings(model))
    write_hf_folder(adapter.to_hf(state_dict), config, folder, max_shard_bytes, dtype)


def write_hf_folder(hf_state_dict: dict[str, torch.Tensor], config: dict, folder: str,
                    max_shard_bytes: int = 5 * 2**30, dtype: torch.dtype | None = None):
    os.makedirs(folder, exist_ok=True)
    shards, current, size = [], {}, 0
    for key in sorted(hf_state_dict):
        t = hf_state_dict[key].detach().to("cpu")
        t = (t.to(dtype) if dtype is not None else t).contiguous()
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = t
        size += nbytes
    shards.append(current)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(folder, name), metadata={"format": "pt"})
        for key, t in shard.items():
            weight_map[key] = name
            total += t.numel() * t.element_size()
    index = os.path.join(folder, "model.safetensors.index.json")
    with open(index, "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    # safetensors writes its files 0600; give them the mode open() gave the index (0666 less the umask)
    for name in set(weight_map.values()):
        os.chmod(os.path.join(folder, name), os.stat(index).st_mode & 0o777)
    dtypes = {t.dtype for shard in shards for t in shard.values() if t.is_floating_point()}
    if len(dtypes) == 1:
        config = {**config, "torch_dtype": str(dtypes.pop()).removeprefix("torch.")}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)


def load_hf_state_dict(model: torch.nn.Module, adapter: HFAdapter, hf_state_dict: dict[str, torch.Tensor]):
    """load_hf_weights from an in-memory HF state dict (e.g. a transformers model's): the same key
    mapping, picking only the tensors the model has (a tied lm_head.weight, SigLIP2's pooling head
    and the like are left out)."""
    available = set(hf_state_dict)
    state_dict = base_state_dict(model)
    hf_keys = [*adapter.rename_to_hf(state_dict), *adapter.fused_parts(state_dict)]
    stored = {k: adapter.stored_name(k, available) for k in hf_keys}
    missing = sorted(v for v in stored.values() if v not in available)
    if missing:
        raise KeyError(f"the HF state dict lacks {len(missing)} tensors the model needs, e.g. {missing[:3]}")
    set_model_state_dict(model, adapter.from_hf({k: hf_state_dict[v] for k, v in stored.items()}),
                         options=StateDictOptions(strict=not adapter_scalings(model)))


def base_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict without LoRA adapters: what an HF checkpoint of the base model holds."""
    return {k: v for k, v in get_model_state_dict(model).items() if not is_adapter_key(k)}
