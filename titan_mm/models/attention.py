"""Attention shared by every model: who attends to whom, and the kernel that computes it.

Every attention in titan_mm is *segment* attention over rows of tokens: a token sees the tokens of
its own segment (a packed document in the decoder, causally; one frame of one image in a vision
encoder, bidirectionally; one window of it in Qwen2.5-VL's window layers). Segments are given per
token as ids computed in the dataloader, so masks are built with tensor ops only (no host syncs).
Padding forms its own segment, so padded positions stay finite and never leak into real ones.

A model builds one ``AttentionMask`` per forward with ``segment_mask`` and hands it to every layer,
which calls ``attend``. The backend decides the kernel:

- ``sdpa``: a dense boolean mask [B, 1, Sq, Sk] and F.scaled_dot_product_attention. Works
  everywhere; the reference. Its memory grows with S^2.
- ``flex``: FlexAttention with a block mask: blocks that no query of a block can see are skipped,
  so packed documents, per-image masks and padding cost little. Compiled (the block's own compile,
  or a compiled call when the block runs eagerly on a GPU).
- ``flex_flash``: the same block masks run by FlashAttention-4's CuTe kernels (FlexAttention's
  ``BACKEND: FLASH``; needs the flash-attn-4 package, Hopper or Blackwell). Faster than ``flex``
  on long documents (2.00 vs 2.84 ms for one causal 8192-token row on an H100), slower on many
  short ones (1.46 vs 1.03 ms for five documents): docs/benchmarks.md.
- ``varlen``: variable-length flash attention over the flattened rows (torch.nn.attention.varlen,
  or flash-attn's ``flash_attn_varlen_func`` when installed). Segment lengths come from the
  dataloader (``document_lengths`` / ``frame_lengths``), so no work is spent on masked pairs. CUDA
  only; segments must be contiguous (Qwen2.5-VL's window layers fall back to ``sdpa``).

This is single-device code. Sequence parallelism (titan_mm/parallel/sequence.py) wraps it from
outside: it swaps the decoder's ``build_mask`` and each attention's ``attend`` for versions that
mask with each token's position in the whole row (``mask_from_positions``) and exchange keys,
values or heads around the kernel.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

try:  # the flash-attn package, when installed, is the fastest varlen kernel on Hopper
    from flash_attn import flash_attn_varlen_func
except ImportError:
    flash_attn_varlen_func = None

BACKENDS = ("sdpa", "flex", "flex_flash", "varlen")


def resolve_backend(name: str, device_type: str) -> str:
    """``auto``: flex on CUDA (the fastest measured on H100, docs/benchmarks.md), sdpa on CPU."""
    if name != "auto":
        return name
    return "flex" if device_type == "cuda" else "sdpa"


@dataclass
class AttentionMask:
    """What every layer of one forward needs to attend; built once by ``segment_mask``."""

    backend: str
    dense: torch.Tensor | None = None
    """sdpa: [B, 1, Sq, Sk] bool, True where the query sees the key."""
    block_mask: object = None
    """flex: a torch.nn.attention.flex_attention.BlockMask."""
    cu_seqlens: torch.Tensor | None = None
    """varlen: int32 [K + 1] offsets of the K segments of the flattened rows."""
    max_seqlen: int = 0
    """varlen: an upper bound of the segment length (the row length: a constant, so compiled
    graphs never see a new value)."""
    causal: bool = False


def segment_mask(segment_ids_BS: torch.Tensor, *, causal: bool, backend: str,
                 segment_lengths_BK: torch.Tensor | None = None) -> AttentionMask:
    """The mask of ``attend`` for whole rows whose tokens carry segment ids.

    segment_lengths_BK: the varlen backend's input, each row's segment lengths in order (padding
    included, zero-padded to a common K).
    """
    pos_S = torch.arange(segment_ids_BS.shape[1], device=segment_ids_BS.device)
    return mask_from_positions(segment_ids_BS, segment_ids_BS, pos_S, pos_S, causal=causal, backend=backend,
                               segment_lengths_BK=segment_lengths_BK)


def mask_from_positions(q_ids_BS: torch.Tensor, kv_ids_BS: torch.Tensor, q_pos_S: torch.Tensor,
                        kv_pos_S: torch.Tensor, *, causal: bool, backend: str,
                        segment_lengths_BK: torch.Tensor | None = None) -> AttentionMask:
    """The mask of ``attend`` for queries and keys given by segment id and position in the whole
    row (sequence parallelism gives each rank's share; segment_lengths_BK always describes whole
    rows, which varlen kernels see)."""
    mask = AttentionMask(backend=backend, causal=causal)
    if backend == "varlen":
        if segment_lengths_BK is None:
            raise ValueError("the varlen attention backend needs segment lengths from the dataloader")
        lengths = segment_lengths_BK.flatten()
        mask.cu_seqlens = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        # the number of segments changes from batch to batch: tell compile up front
        torch._dynamo.mark_dynamic(mask.cu_seqlens, 0)
        mask.max_seqlen = kv_ids_BS.shape[1]
        return mask

    if backend == "sdpa":
        visible = q_ids_BS[:, :, None] == kv_ids_BS[:, None, :]
        if causal:
            visible = visible & (kv_pos_S[None, :] <= q_pos_S[:, None])
        mask.dense = visible[:, None]
    elif backend in ("flex", "flex_flash"):
        mask.block_mask = _flex_block_mask(q_ids_BS, kv_ids_BS, q_pos_S, kv_pos_S, causal)
    else:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    return mask


def _flex_block_mask(q_ids, kv_ids, q_pos, kv_pos, causal: bool):
    from torch.nn.attention.flex_attention import create_block_mask

    def same_segment(b, h, q, kv):
        visible = q_ids[b, q] == kv_ids[b, kv]
        if causal:
            visible = visible & (kv_pos[kv] <= q_pos[q])
        return visible

    B, Sq, Sk = q_ids.shape[0], q_ids.shape[1], kv_ids.shape[1]
    # compiled on GPUs: the block map is computed without materialising [Sq, Sk] in eager ops
    return create_block_mask(same_segment, B, None, Sq, Sk, device=q_ids.device, _compile=q_ids.is_cuda)


def attend(q_BSHD: torch.Tensor, k_BSHD: torch.Tensor, v_BSHD: torch.Tensor,
           mask: AttentionMask) -> torch.Tensor:
    """Attention over [B, S, heads, head_dim] tensors; k/v may have fewer heads than q (grouped
    queries), and more positions (context parallelism: the whole row's). Returns [B, S, heads,
    head_dim]."""
    gqa = k_BSHD.shape[2] != q_BSHD.shape[2]
    if mask.backend == "varlen":
        B, S, H, D = q_BSHD.shape
        q, k, v = (t.reshape(B * S, t.shape[2], D) for t in (q_BSHD, k_BSHD, v_BSHD))
        if flash_attn_varlen_func is not None:
            out = flash_attn_varlen_func(q, k, v, mask.cu_seqlens, mask.cu_seqlens, mask.max_seqlen,
                                         mask.max_seqlen, causal=mask.causal)
        else:
            from torch.nn.attention.varlen import varlen_attn
            if gqa:  # varlen_attn of torch 2.11 takes equal head counts
                k = k.repeat_interleave(H // k.shape[1], dim=1)
                v = v.repeat_interleave(H // v.shape[1], dim=1)
            out = varlen_attn(q, k, v, mask.cu_seqlens, mask.cu_seqlens, mask.max_seqlen, mask.max_seqlen,
                              window_size=(-1, 0) if mask.causal else (-1, -1))
        return out.view(B, S, H, D)

    q, k, v = (t.transpose(1, 2) for t in (q_BSHD, k_BSHD, v_BSHD))
    if mask.backend in ("flex", "flex_flash"):
        out = _flex_attention(q, k, v, block_mask=mask.block_mask, enable_gqa=gqa,
                              flash=mask.backend == "flex_flash")
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense, enable_gqa=gqa)
    return out.transpose(1, 2)


_compiled_flex = None

FLEX_CUDA_TILES = dict(BLOCK_M=128, BLOCK_N=64, BLOCK_M1=64, BLOCK_N1=128, BLOCK_M2=128, BLOCK_N2=64,
                       num_warps=8, num_stages=3)
"""FlexAttention tile sizes on GPUs: 128-query x 64-key forward tiles. On an H100 with packed
documents (1024 + 3072 + 2048 + 512 + 1536 tokens, 16 x 128-dim heads) forward + backward take
1.10 ms instead of 1.61 ms with the defaults (scripts/bench_attention.py, docs/benchmarks.md)."""


def _flex_attention(q, k, v, flash: bool, **kwargs):
    """flex_attention, compiled: inside a compiled block it is traced as it is; an eager block on
    a GPU calls a compiled copy (eager FlexAttention materialises the scores). Eager on CPU.
    flash: FlashAttention-4 kernels instead of the Triton ones (GPUs)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention
    if not q.is_cuda:
        return flex_attention(q, k, v, **kwargs)
    kwargs["kernel_options"] = {"BACKEND": "FLASH"} if flash else FLEX_CUDA_TILES
    if torch.compiler.is_compiling():
        return flex_attention(q, k, v, **kwargs)
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention)
    return _compiled_flex(q, k, v, **kwargs)
