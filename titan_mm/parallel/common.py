"""Parallelisms every family applies the same way to its transformer blocks."""

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard


def apply_activation_checkpointing(blocks: nn.ModuleDict):
    """Recompute each block's activations in backward."""
    for name, block in blocks.items():
        blocks[name] = checkpoint_wrapper(block, preserve_rng_state=False)


def apply_compile(blocks: nn.ModuleDict):
    """torch.compile each block: one graph per block, reused by every layer of the same shape."""
    for block in blocks.values():
        block.compile(fullgraph=True)


def apply_fsdp(blocks: list[nn.Module], root: nn.Module, mesh: DeviceMesh, param_dtype: torch.dtype):
    """Shard each block on its own (parameters gathered per block), then the rest with the root."""
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(root, mesh=mesh, mp_policy=mp)
