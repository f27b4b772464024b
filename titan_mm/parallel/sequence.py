"""Sequence parallelism for the decoder: context parallel (CP) and Ulysses.

Both split every row of the batch along the sequence over a group of ranks that hold the same
parameters (FSDP shards over them) and see the same rows:

- **CP**: each rank keeps two of the 2 x cp equal chunks of the row, chunk r and chunk 2cp-1-r, so
  every rank has the same share of causal attention work (load balancing). Attention all-gathers
  keys and values from the group (the gradients are reduce-scattered back) and masks with each
  token's position in the whole row, so packed documents stay separate and causal.
- **Ulysses**: each rank keeps one contiguous chunk; around the attention kernel an all-to-all
  turns "my chunk, all heads" into "whole row, my heads" and back. Query heads divide by the
  degree; KV heads divide by it too, or else divide it (each KV head is then repeated, so every
  rank gets the one its query heads share: ``kv_sequence_to_heads``).

Outside attention every op is per token, so rotary positions, loss targets and image tokens are
simply sharded with the tokens (``shard_batch``). The vision encoder does not repeat its work on
each rank: the image slots are split over the group and the merged embeddings all-gathered
(``split_vision_encoder``).

Model code knows nothing of this: ``apply_sequence_parallel`` swaps the decoder's ``build_mask``
and each attention's ``attend`` (callable attributes) for this file's versions, and hooks the vision
encoder's input and output. All communication is through functional collectives (autograd-aware,
traceable by compile), so this runs on CPU (gloo) and GPU alike.
"""

import functools
import math
from dataclasses import dataclass

import torch
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from titan_mm.models.attention import AttentionMask, attend, mask_from_positions

# torch 2.13 renamed the autograd all-gather; 2.11 has only the old name
_all_gather = getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd


def all_gather(x: torch.Tensor, dim: int, mesh: DeviceMesh) -> torch.Tensor:
    """Every rank's ``x`` concatenated along ``dim`` in rank order; autograd: reduce-scatter."""
    out = _all_gather(x.movedim(dim, 0).contiguous(), 0, mesh)
    return out.movedim(0, dim)


SEQUENCE_KEYS = ("input_ids", "labels", "document_ids", "image_token_index", "position_ids", "targets",
                 "loss_tokens")
"""Batch tensors with a sequence axis (the last one); everything else is whole on every rank."""


@dataclass
class SequenceParallel:
    mode: str
    """"cp" or "ulysses"."""
    mesh: DeviceMesh
    """The 1-D group of ranks that share each row."""

    @property
    def degree(self) -> int:
        return self.mesh.size()

    @property
    def rank(self) -> int:
        return self.mesh.get_local_rank()

    def chunk_order(self) -> list[int]:
        """Row chunks in the order the group's ranks hold them (rank 0's first): CP cuts the row
        into 2 x degree chunks and gives rank r chunks r and 2 x degree - 1 - r."""
        if self.mode == "ulysses":
            return list(range(self.degree))
        n = 2 * self.degree
        return [c for r in range(self.degree) for c in (r, n - 1 - r)]

    def chunks_per_rank(self) -> int:
        return 1 if self.mode == "ulysses" else 2

    def row_positions(self, local_len: int, device, gathered: bool) -> torch.Tensor:
        """Positions in the whole row of this rank's tokens, or (gathered) of every rank's tokens
        in all-gather order."""
        per_rank = self.chunks_per_rank()
        chunk = local_len // per_rank
        order = self.chunk_order()
        if not gathered:
            order = order[self.rank * per_rank:(self.rank + 1) * per_rank]
        starts = torch.tensor(order, device=device) * chunk
        return (starts[:, None] + torch.arange(chunk, device=device)).flatten()

    def shard(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's share of a whole-row tensor along ``dim``."""
        per_rank = self.chunks_per_rank()
        chunks = x.chunk(self.degree * per_rank, dim=dim)
        mine = self.chunk_order()[self.rank * per_rank:(self.rank + 1) * per_rank]
        return torch.cat([chunks[c] for c in mine], dim=dim)

    def gather_sequence(self, x_BS: torch.Tensor) -> torch.Tensor:
        """Every rank's slice of dim 1, concatenated in rank order (autograd: reduce-scatter)."""
        return all_gather(x_BS, 1, self.mesh)

    def sequence_to_heads(self, x_BSHD: torch.Tensor) -> torch.Tensor:
        """[B, S/u, H, D] -> [B, S, H/u, D] (Ulysses)."""
        B, S_local, H, D = x_BSHD.shape
        u = self.degree
        # send head group j to rank j; receive rank i's sequence chunk as block i
        x = x_BSHD.reshape(B, S_local, u, H // u, D).permute(2, 0, 1, 3, 4).contiguous()
        x = funcol.all_to_all_single_autograd(x, None, None, group=self.mesh)
        return x.permute(1, 0, 2, 3, 4).reshape(B, u * S_local, H // u, D)

    def kv_sequence_to_heads(self, x_BSHD: torch.Tensor) -> torch.Tensor:
        """sequence_to_heads for keys or values. With fewer KV heads h than ranks u (u a multiple of
        h), each KV head is first repeated u / h times: rank r then receives KV head r // (u / h),
        the one its query heads [r H/u, (r+1) H/u) read under GQA (query head j reads KV head
        j // (H / h)). Autograd sums the gradients of the copies."""
        copies = self.degree // x_BSHD.shape[2]
        if copies > 1:
            x_BSHD = x_BSHD.repeat_interleave(copies, dim=2)  # [B, S/u, h, D] -> [B, S/u, u, D]
        return self.sequence_to_heads(x_BSHD)

    def heads_to_sequence(self, x_BSHD: torch.Tensor) -> torch.Tensor:
        """[B, S, H/u, D] -> [B, S/u, H, D] (the inverse of sequence_to_heads)."""
        B, S, H_local, D = x_BSHD.shape
        u = self.degree
        x = x_BSHD.reshape(B, u, S // u, H_local, D).permute(1, 0, 2, 3, 4).contiguous()
        x = funcol.all_to_all_single_autograd(x, None, None, group=self.mesh)
        return x.permute(1, 2, 0, 3, 4).reshape(B, S // u, u * H_local, D)


def shard_batch(batch: dict, sp: SequenceParallel) -> dict:
    """This rank's tokens of every row (the tensors of SEQUENCE_KEYS, sequence on the last axis)."""
    return {k: sp.shard(v, dim=-1) if k in SEQUENCE_KEYS else v for k, v in batch.items()}


def sequence_parallel_mask(segment_ids_BS: torch.Tensor, *, causal: bool, backend: str,
                           segment_lengths_BK: torch.Tensor | None = None,
                           sp: SequenceParallel) -> AttentionMask:
    """The decoder's mask on this rank's share of each row: the kernel sees the whole row's keys
    (CP), or the whole row's queries and keys (Ulysses), masked by their positions in the row."""
    if backend == "varlen" and sp.mode == "cp":
        raise ValueError("context parallelism needs the sdpa or flex attention backend")
    S_local, device = segment_ids_BS.shape[1], segment_ids_BS.device
    kv_ids = sp.gather_sequence(segment_ids_BS)
    kv_pos = sp.row_positions(S_local, device, gathered=True)
    if sp.mode == "ulysses":  # queries are the whole row too
        q_ids, q_pos = kv_ids, kv_pos
    else:
        q_ids, q_pos = segment_ids_BS, sp.row_positions(S_local, device, gathered=False)
    return mask_from_positions(q_ids, kv_ids, q_pos, kv_pos, causal=causal, backend=backend,
                               segment_lengths_BK=segment_lengths_BK)


def sequence_parallel_attend(q_BSHD: torch.Tensor, k_BSHD: torch.Tensor, v_BSHD: torch.Tensor,
                             mask: AttentionMask, *, sp: SequenceParallel) -> torch.Tensor:
    """``attend`` on this rank's share of the row: Ulysses trades the sequence split for a head
    split around the kernel; CP gives the kernel every rank's keys and values."""
    if sp.mode == "ulysses":
        # this rank's slice of the row with all heads -> the whole row with a slice of the heads
        q_BSHD = sp.sequence_to_heads(q_BSHD)
        k_BSHD, v_BSHD = sp.kv_sequence_to_heads(k_BSHD), sp.kv_sequence_to_heads(v_BSHD)
        return sp.heads_to_sequence(attend(q_BSHD, k_BSHD, v_BSHD, mask))
    k_BSHD, v_BSHD = sp.gather_sequence(k_BSHD), sp.gather_sequence(v_BSHD)
    return attend(q_BSHD, k_BSHD, v_BSHD, mask)


def split_vision_encoder(encoder: nn.Module, last: nn.Module, sp: SequenceParallel):
    """Hooks that run ``encoder`` (forward(pixels [N, L, D], grid [N, L, 3], frame_lengths [N, F]
    or None)) on this rank's share of the N image slots, and all-gather the output of ``last``
    (the encoder itself, or a per-token module run on its output, e.g. a projector: a merged
    embedding tensor [N * L', D], or a tuple of such tensors and lists of them; image-slot major).
    The group splits the vision work instead of repeating it; N divides by the degree (checked up
    front)."""
    def my_slots(module, args):
        return tuple(None if x is None else x.chunk(sp.degree)[sp.rank] for x in args)

    def gather(x):
        return all_gather(x, 0, sp.mesh)

    def gather_output(module, args, out):
        if isinstance(out, torch.Tensor):
            return gather(out)
        return type(out)(gather(x) if isinstance(x, torch.Tensor) else [gather(y) for y in x] for x in out)

    encoder.register_forward_pre_hook(my_slots)
    last.register_forward_hook(gather_output)


def check_sequence_parallel(dims, decoder_args, seq_len: int, image_slots: int, backend: str):
    """Every size that CP / Ulysses split must divide (checked before any compute).

    dims: ParallelDims; image_slots: image slots of one vision-encoder forward (rows x N: the local
    batch, or one pipeline microbatch under pipeline parallelism), split over the group.
    """
    from titan_mm.parallel.parallel_dims import ParallelismError
    if dims.cp_enabled and dims.ulysses_enabled:
        raise ParallelismError("context_parallel_degree and ulysses_degree cannot both be > 1; "
                               "pick one sequence-parallel dimension")
    if dims.cp_enabled:
        if seq_len % (2 * dims.cp):
            raise ParallelismError(f"training.seq_len={seq_len} must divide by 2 x context_parallel_degree "
                                   f"= {2 * dims.cp} (load-balanced chunks); change one of them")
        if backend == "varlen":
            raise ParallelismError("context parallelism needs model.attention_backend = flex, sdpa or "
                                   "auto (varlen kernels take one token set for queries and keys)")
    if dims.ulysses_enabled:
        dims.check_divisible("training.seq_len", seq_len, "ulysses")
        heads, kv_heads = decoder_args.n_heads // dims.tp, decoder_args.n_kv_heads // dims.tp
        valid = [u for u in range(1, heads + 1)
                 if heads % u == 0 and (kv_heads % u == 0 or u % kv_heads == 0)]
        if dims.ulysses not in valid:
            raise ParallelismError(
                f"ulysses degree {dims.ulysses} must divide num_heads per tensor-parallel rank = {heads} "
                f"and divide or be a multiple of num_kv_heads per tensor-parallel rank = {kv_heads} "
                f"(KV heads are repeated up to the degree); choose ulysses in {valid}")
    degree = dims.cp * dims.ulysses
    if degree == 1:
        return
    if (seq_len // degree) % dims.tp:
        need = math.lcm(2 * degree if dims.cp_enabled else degree, degree * dims.tp)
        raise ParallelismError(
            f"tp degree {dims.tp} does not divide the {seq_len // degree} tokens (training.seq_len / "
            f"{degree}) each sequence-parallel rank keeps of a row, which tensor parallelism splits "
            f"further; make training.seq_len a multiple of {need}")
    if image_slots % degree:
        rows = ("training.local_batch_size / pipeline_parallel_microbatches" if dims.pp_enabled
                else "training.local_batch_size")
        raise ParallelismError(
            f"the vision encoder splits the {image_slots} image slots of each forward ({rows} rows x "
            f"data.image_slots_per_row) over the {degree} sequence-parallel ranks; make it a multiple "
            f"of {degree}")


def sequence_parallel_group(mesh, dims) -> SequenceParallel | None:
    """The CP or Ulysses group this rank belongs to, or None without sequence parallelism."""
    if dims.cp_enabled:
        return SequenceParallel("cp", mesh["cp"])
    if dims.ulysses_enabled:
        return SequenceParallel("ulysses", mesh["ulysses"])
    return None


def apply_sequence_parallel(model: nn.Module, mesh, dims, vision_output: nn.Module | None = None):
    """Under CP or Ulysses: the decoder masks and attends over this rank's share of each row, and
    the vision encoder (``model.vision`` when this stage has one) splits its image slots over the
    group, its embeddings all-gathered at the output of ``vision_output`` (default: the
    encoder)."""
    sp = sequence_parallel_group(mesh, dims)
    if sp is None:
        return
    decoder = model.decoder
    decoder.build_mask = functools.partial(sequence_parallel_mask, sp=sp)
    for layer in decoder.layers.values():
        layer.attention.attend = functools.partial(sequence_parallel_attend, sp=sp)
    if getattr(model, "vision", None) is not None:
        split_vision_encoder(model.vision, vision_output or model.vision, sp)
