"""Muon (Jordan et al. 2024) with Moonlight's update scale (Liu et al. 2025), and AdamW for the rest.

Each weight matrix of a transformer block gets the Nesterov momentum of its gradient, orthogonalised
by a quintic Newton-Schulz iteration, times 0.2 * sqrt(max(rows, cols)): that gives the update the
RMS of a typical AdamW update (about 0.2), so AdamW's learning rate and weight decay carry over.
Every other parameter (embeddings, output head, norms, biases, position tables, projector and patch
embedding) takes an AdamW step inside the same ``step()``.

On one device, same-shape matrices are orthogonalised as one stack (batched matmuls): on an H100
that took Qwen3-VL-2B's Muon step from 275 to 173 ms (docs/optimizers.md).

Distributed (FSDP2, TP, both): parameters and gradients are DTensor shards, and Newton-Schulz of a
shard is not the shard of Newton-Schulz. The matrices of each process group (the ranks that hold
different shards of them) are dealt round-robin to its ranks: one all-to-all hands every rank the
shards of the matrices it owns, each rank orthogonalises its whole matrices, and a second all-to-all
returns the shards. No rank orthogonalises a shard, and each matrix is whole on its owner only.
Where each shard sits in the matrix is read off the DTensor placements (Shard, and the
_StridedShard that FSDP2 puts over a tensor-parallel dim), with DTensor's own split rule.
"""

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.optim.adam import adam
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
"""Keller Jordan's quintic: steep at zero, so 5 steps bring singular values into about [0.7, 1.2]."""


STACK_ELEMENTS = 1 << 27
"""At most this many elements in one stack of same-shape matrices orthogonalised together (256 MB
in bf16): one batched matmul for many small matrices instead of a launch each."""


def orthogonalise(g: torch.Tensor, steps: int, dtype: torch.dtype) -> torch.Tensor:
    """Approximately U V^T of g = U S V^T (quintic Newton-Schulz), in ``dtype``: of one matrix
    (M, N), or of each matrix of a stack (B, M, N)."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(dtype)
    tall = x.shape[-2] > x.shape[-1]
    if tall:  # iterate on the smaller Gram matrix
        x = x.mT
    x = x / (torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True) + 1e-7)
    stack = x if x.ndim == 3 else x.unsqueeze(0)
    for _ in range(steps):  # X <- a X + (b A + c A^2) X, A = X X^T: two fused multiply-adds
        gram = stack @ stack.mT
        stack = torch.baddbmm(stack, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), stack, beta=a)
    x = stack if x.ndim == 3 else stack.squeeze(0)
    return x.mT if tall else x


def update_scale(shape: torch.Size) -> float:
    """Moonlight's 0.2 * sqrt(max(m, n)): the orthogonalised update gets AdamW's update RMS."""
    return 0.2 * math.sqrt(max(shape[0], shape[1]))


@dataclass
class ShardLayout:
    """Where each rank's shard of one matrix sits in the whole matrix."""

    group: dist.ProcessGroup
    """The ranks holding different shards (the sharded mesh dims)."""
    index: list[tuple]
    """Per group rank: the rows and columns of its shard (an index tensor, or slice(None) for all)."""
    shapes: list[torch.Size]
    """Per group rank: the shape of its shard."""


class Muon(torch.optim.Optimizer):
    """Param groups with ``use_muon`` take Muon steps, the others AdamW steps (decoupled weight decay).

    lr, weight_decay: per group (AdamW's values carry over to the Muon groups). momentum, nesterov:
    the Muon groups'; betas, eps, fused, foreach: the AdamW groups'. ns_steps, ns_dtype: the
    Newton-Schulz iteration's, for every matrix.
    """

    def __init__(self, groups: list[dict], *, lr: float, momentum: float, nesterov: bool, ns_steps: int,
                 ns_dtype: torch.dtype, betas: tuple[float, float], eps: float, fused: bool, foreach: bool):
        defaults = dict(lr=lr, weight_decay=0.0, use_muon=False, momentum=momentum, nesterov=nesterov,
                        betas=betas, eps=eps, fused=fused, foreach=foreach)
        super().__init__(groups, defaults)
        self.ns_steps, self.ns_dtype = ns_steps, ns_dtype
        self.layouts = shard_layouts([p for g in self.param_groups if g["use_muon"] for p in g["params"]])

    @torch.no_grad()
    def step(self, closure=None):
        # found_inf (train/nonfinite.py): 1.0 = leave parameters and state exactly as they are
        found_inf = getattr(self, "found_inf", None)
        for group in self.param_groups:
            if not group["use_muon"]:
                self._adamw_step(group, found_inf)
        self._muon_step([g for g in self.param_groups if g["use_muon"]], found_inf)

    def _adamw_step(self, group: dict, found_inf: torch.Tensor | None):
        params = [p for p in group["params"] if p.grad is not None]
        for p in params:
            if not self.state[p]:
                # the step count on the device for the fused kernel, on the host otherwise (as torch.optim.AdamW)
                step_device = p.device if group["fused"] else "cpu"
                self.state[p] = {"step": torch.zeros((), dtype=torch.float32, device=step_device),
                                 "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
        if not params:
            return
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        adam(
            params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
            [], [s["step"] for s in states], foreach=group["foreach"], fused=group["fused"],
            found_inf=found_inf if group["fused"] else None, decoupled_weight_decay=True, amsgrad=False,
            beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"],
            maximize=False)

    def _muon_step(self, groups: list[dict], found_inf: torch.Tensor | None):
        """Whole matrices (one process, or replicated) in stacks of one shape, up to STACK_ELEMENTS;
        sharded ones in batches of one matrix per rank of their process group. At most one stack's
        or batch's updates exist at a time."""
        whole: dict = {}
        sharded: dict = {}
        for group in groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                layout = self.layouts.get(p)
                if layout is None:
                    whole.setdefault(tuple(p.shape), []).append((p, group))
                else:
                    sharded.setdefault(layout.group, []).append((p, group))
        for shape, members in whole.items():
            per_stack = max(1, STACK_ELEMENTS // math.prod(shape))
            for start in range(0, len(members), per_stack):
                stack = members[start:start + per_stack]
                updates = torch.stack([self._momentum_update(p, group, found_inf) for p, group in stack])
                for (p, group), ortho in zip(stack, orthogonalise(updates, self.ns_steps, self.ns_dtype)):
                    self._apply(p, group, ortho, found_inf)
        for process_group, members in sharded.items():
            world = dist.get_world_size(process_group)
            # round-robin: matrix k of each batch of `world` is orthogonalised by group rank k
            for start in range(0, len(members), world):
                batch = members[start:start + world]
                updates = [self._momentum_update(p, group, found_inf) for p, group in batch]
                results = self.orthogonalise_batch(process_group, [p for p, _ in batch], updates)
                for (p, group), ortho in zip(batch, results):
                    self._apply(p, group, ortho, found_inf)

    def _momentum_update(self, p: torch.Tensor, group: dict, found_inf) -> torch.Tensor:
        """This rank's shard of the (Nesterov) momentum update of ``p``."""
        state = self.state[p]
        if not state:
            state["momentum_buffer"] = torch.zeros_like(p)
        return nesterov_momentum(_local(p.grad), _local(state["momentum_buffer"]), group, found_inf)

    @staticmethod
    def _apply(p: torch.Tensor, group: dict, ortho: torch.Tensor, found_inf):
        """W <- W (1 - lr wd) - lr 0.2 sqrt(max(m, n)) O, on this rank's shard."""
        p_local = _local(p)
        step_size = group["lr"] * update_scale(p.shape)
        new = p_local * (1 - group["lr"] * group["weight_decay"]) - step_size * ortho.to(p_local.dtype)
        p_local.copy_(new if found_inf is None else torch.where(found_inf > 0, p_local, new))

    def orthogonalise_batch(self, group, params: list[torch.Tensor],
                            updates: list[torch.Tensor]) -> list[torch.Tensor]:
        """Up to world-size matrices of one process group: all-to-all the shards of matrix k to group
        rank k, which orthogonalises the whole matrix, all-to-all the shards back."""
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        dtype = updates[0].dtype
        send_sizes = [updates[k].numel() if k < len(params) else 0 for k in range(world)]
        mine = self.layouts[params[rank]] if rank < len(params) else None
        recv_sizes = [math.prod(mine.shapes[s]) if mine else 0 for s in range(world)]
        received = _all_to_all(torch.cat([u.reshape(-1) for u in updates]), recv_sizes, send_sizes, group)
        if mine is not None:
            full = updates[0].new_empty(params[rank].shape, dtype=dtype)
            for s, piece in enumerate(received.split(recv_sizes)):
                full[mine.index[s]] = piece.view(mine.shapes[s])
            full = orthogonalise(full, self.ns_steps, self.ns_dtype).to(dtype)
            send = torch.cat([full[mine.index[s]].reshape(-1) for s in range(world)])
        else:
            send = updates[0].new_empty(0)
        returned = _all_to_all(send, send_sizes, recv_sizes, group)
        return [piece.view(updates[k].shape) for k, piece in enumerate(returned.split(send_sizes)[:len(params)])]


def nesterov_momentum(grad: torch.Tensor, buf: torch.Tensor, group: dict, found_inf) -> torch.Tensor:
    """buf <- momentum * buf + (1 - momentum) * grad; the update is grad + momentum * (buf - grad)
    with Nesterov, else buf. A flagged step leaves buf as it was (and its update is discarded)."""
    new_buf = buf.lerp(grad, 1 - group["momentum"])
    buf.copy_(new_buf if found_inf is None else torch.where(found_inf > 0, buf, new_buf))
    return grad.lerp(new_buf, group["momentum"]) if group["nesterov"] else new_buf


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _all_to_all(send: torch.Tensor, recv_sizes: list[int], send_sizes: list[int], group) -> torch.Tensor:
    received = send.new_empty(sum(recv_sizes))
    dist.all_to_all_single(received, send.contiguous(), recv_sizes, send_sizes, group=group)
    return received


# --- where each rank's shard sits -----------------------------------------------------------------

def shard_layouts(params: list[torch.Tensor]) -> dict:
    """ShardLayout of every DTensor matrix that is sharded (plain tensors and replicated DTensors
    are whole on their rank). Creates one process group per set of ranks that share a matrix's
    shards: every rank calls this with its own parameters, and all create the same groups."""
    members_of = {}
    for p in params:
        if isinstance(p, DTensor) and _sharded_dims(p):
            members_of[p] = _group_members(p)
    if not dist.is_initialized():
        return {}
    groups = _new_groups(set(members_of.values()))
    return {p: _layout(p, groups[members]) for p, members in members_of.items()}


def _sharded_dims(p: DTensor) -> list[int]:
    dims = [k for k, pl in enumerate(p.placements) if isinstance(pl, (Shard, _StridedShard))]
    others = [pl for pl in p.placements if not isinstance(pl, (Shard, _StridedShard, Replicate))]
    if others:
        raise NotImplementedError(f"Muon cannot place shards of a DTensor with placements {p.placements}")
    return dims


def _group_members(p: DTensor) -> tuple[int, ...]:
    """The global ranks that hold this rank's replica of ``p``, sharded, in row-major mesh order."""
    mesh = p.device_mesh
    coord = mesh.get_coordinate()
    ranks = mesh.mesh
    for k in reversed(range(mesh.ndim)):
        if k not in _sharded_dims(p):
            ranks = ranks.select(k, coord[k])
    return tuple(ranks.flatten().tolist())


def _new_groups(mine: set[tuple[int, ...]]) -> dict:
    """A process group for each member set of any rank (every rank creates every group, in one order)."""
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, sorted(mine))
    groups = {}
    for members in sorted({m for sets in everyone for m in sets}):
        group = dist.new_group(ranks=sorted(members))
        if members in mine:
            groups[members] = group
    return groups


def _layout(p: DTensor, group) -> ShardLayout:
    mesh = p.device_mesh
    sharded = _sharded_dims(p)
    coord = list(mesh.get_coordinate())
    coords_by_rank = {}
    for flat, rank in enumerate(_group_members(p)):
        c = list(coord)
        for k, i in zip(sharded, _unravel(flat, [mesh.size(k) for k in sharded])):
            c[k] = i
        coords_by_rank[rank] = c
    index, shapes = [], []
    for g in range(dist.get_world_size(group)):
        c = coords_by_rank[dist.get_global_rank(group, g)]
        rows, cols = (_dim_index(p, d, c) for d in (0, 1))
        shapes.append(torch.Size([_length(rows, p.shape[0]), _length(cols, p.shape[1])]))
        if isinstance(rows, torch.Tensor) and isinstance(cols, torch.Tensor):
            rows, cols = rows[:, None], cols[None, :]  # index tensors on both dims select a block
        index.append((rows, cols))
    mine = shapes[dist.get_rank(group)]
    if mine != p.to_local().shape:
        raise AssertionError(f"Muon placed this rank's shard of a {tuple(p.shape)} matrix with placements "
                             f"{p.placements} as {tuple(mine)}, but it is {tuple(p.to_local().shape)}")
    return ShardLayout(group, index, shapes)


def _dim_index(p: DTensor, dim: int, coord: list[int]):
    """The indices along ``dim`` of the shard at mesh coordinate ``coord`` (slice(None) if whole),
    by DTensor's own split rule applied to the positions 0 .. size-1."""
    positions = torch.arange(p.shape[dim], device=p.to_local().device)
    whole = True
    for k, pl in enumerate(p.placements):
        if isinstance(pl, _StridedShard) and pl.dim == dim:
            split = _StridedShard(0, split_factor=pl.split_factor)
        elif isinstance(pl, Shard) and pl.dim == dim:
            split = Shard(0)
        else:
            continue
        positions = split._split_tensor(positions, p.device_mesh.size(k), with_padding=False)[0][coord[k]]
        whole = False
    return slice(None) if whole else positions


def _length(index, size: int) -> int:
    return size if isinstance(index, slice) else index.numel()


def _unravel(flat: int, sizes: list[int]) -> list[int]:
    out = []
    for size in reversed(sizes):
        flat, i = divmod(flat, size)
        out.append(i)
    return out[::-1]
