"""Parallelisms every family applies the same way to its transformer blocks."""

import contextlib

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard


def apply_compile(blocks: nn.ModuleDict, mode: str | None = None):
    """torch.compile each block: one graph per block, reused by every layer of the same shape."""
    for block in blocks.values():
        block.compile(fullgraph=True, mode=mode)


def group_by_mesh(params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Parameters split by DTensor mesh, plain tensors apart: foreach kernels (optimizer, gradient
    clipping) reject lists that mix them, as tensor-parallel blocks beside replicated layers do."""
    groups: dict = {}
    for p in params:
        groups.setdefault(p.device_mesh if isinstance(p, DTensor) else None, []).append(p)
    return list(groups.values())


def fsdp_mesh(mesh: DeviceMesh, dp_replicate: int) -> DeviceMesh:
    """1-D FSDP mesh, or 2-D (replicate, shard) for HSDP."""
    return mesh["dp_replicate", "fsdp"] if dp_replicate > 1 else mesh["fsdp"]


def apply_fsdp(blocks: list[nn.Module], root: nn.Module, mesh: DeviceMesh, param_dtype: torch.dtype):
    """Shard each block on its own (parameters gathered per block), then the rest with the root.

    Gradients are summed, not averaged, across ranks: the loss is already divided by the global
    number of label tokens.
    """
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for module in (*blocks, root):
        fully_shard(module, mesh=mesh, mp_policy=mp)
        module.set_gradient_divide_factor(1.0)
        # plain SUM collectives: gloo (CPU) has no pre-multiplied sum
        module.set_force_sum_reduction_for_comms(True)


@contextlib.contextmanager
def fsdp_gathered(model: nn.Module):
    """Inside, every FSDP module of ``model`` keeps its parameters gathered: forwards issue no
    collectives, so ranks may run different numbers of them (evaluation of each rank's share of the
    samples, generation of different lengths). Costs the whole model's memory on every rank.
    Afterwards the parameters are sharded again, resharding after forward as apply_fsdp leaves it
    (fully_shard's default: every module but the root)."""
    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for module in modules:
        module.unshard()
        module.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for module in modules:
            module.reshard()
            module.set_reshard_after_forward(module is not model, recurse=False)
