"""A key/value cache for incremental decoding, attached to a decoder from outside.

The decoder's model code is the training code: it builds one attention mask per forward through
its ``build_mask`` attribute and every attention layer attends through its ``attend`` attribute
(the hooks sequence parallelism uses, titan_mm/parallel/sequence.py). ``KVCache.attached`` swaps
both for the cache's own for the duration of a ``with`` block and puts the originals back after:

- ``build_mask`` receives the new tokens' document ids (-1 = left padding), records which cache
  positions hold real tokens, and returns a dense mask of the new queries over every cached key:
  a query sees the real keys at or before its own position, and itself (so a padding query stays
  finite);
- each layer's ``attend`` writes its new keys and values at the cache's cursor and attends over
  the whole cache (what is not written yet is masked) with the shared kernel (``attend`` of
  titan_mm/models/attention.py, sdpa; grouped-query heads are not repeated in the cache).

The caller advances the cursor by the number of tokens of each forward (``advance``). Rows are
left-padded to a common length, so every row writes at the same cache position; rotary positions
are the caller's, per row.
"""

import contextlib

import torch

from titan_mm.models.attention import AttentionMask, attend


class KVCache:
    """Keys and values of ``n_layers`` layers for ``batch`` rows of at most ``max_len`` tokens.

    Every shape is fixed: new tokens are written at the device-side ``cursor`` and attention
    always reads the whole ``max_len`` cache with a mask, so a decode step has the same shapes
    and the same kernels every time (a CUDA graph can replay it)."""

    def __init__(self, n_layers: int, batch: int, max_len: int, n_kv_heads: int, head_dim: int, *,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (n_layers, batch, max_len, n_kv_heads, head_dim)
        self.k_LBTHD = torch.zeros(shape, dtype=dtype, device=device)
        self.v_LBTHD = torch.zeros(shape, dtype=dtype, device=device)
        self.real_BT = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        """Which cached positions hold real tokens (False: left padding, or not written yet)."""
        self.cursor = torch.zeros(1, dtype=torch.long, device=device)
        """Where the next token is written (on the device: a replayed graph advances it too)."""
        self.new_positions = None
        """Cache positions of the forward in progress (set by build_mask)."""

    @classmethod
    def for_decoder(cls, decoder, batch: int, max_len: int, *, dtype: torch.dtype,
                    device: torch.device | str) -> "KVCache":
        a = decoder.args
        return cls(a.n_layers, batch, max_len, a.n_kv_heads, a.head_dim, dtype=dtype, device=device)

    @contextlib.contextmanager
    def attached(self, decoder):
        """Within the block, ``decoder`` (and a model around it) attends through this cache."""
        if not decoder.args.causal:
            raise ValueError("a KV cache needs causal attention; a bidirectional (MDLM) decoder samples "
                             "with titan_mm/objectives/mdlm_sampler.py")
        layers = list(decoder.layers.values())
        saved = decoder.build_mask, [layer.attention.attend for layer in layers]
        decoder.build_mask = self.build_mask
        for i, layer in enumerate(layers):
            layer.attention.attend = _CachedAttend(self, i)
        try:
            yield self
        finally:
            decoder.build_mask = saved[0]
            for layer, original in zip(layers, saved[1]):
                layer.attention.attend = original

    def build_mask(self, document_ids_BS: torch.Tensor, *, causal: bool, backend: str,
                   segment_lengths_BK: torch.Tensor | None = None) -> AttentionMask:
        """The decoder's ``build_mask``: [B, 1, S, max_len] over the cache, S new tokens at the
        cursor (the caller sizes the cache so that they fit)."""
        device = document_ids_BS.device
        self.new_positions = self.cursor + torch.arange(document_ids_BS.shape[1], device=device)
        self.real_BT.index_copy_(1, self.new_positions, document_ids_BS >= 0)
        q_pos_S1 = self.new_positions[:, None]
        k_pos_T = torch.arange(self.real_BT.shape[1], device=device)
        visible_BST = (self.real_BT[:, None] & (k_pos_T <= q_pos_S1)) | (k_pos_T == q_pos_S1)
        return AttentionMask(backend="sdpa", dense=visible_BST[:, None], causal=True)

    def write_and_attend(self, layer: int, q_BSHD: torch.Tensor, k_BSHD: torch.Tensor, v_BSHD: torch.Tensor,
                         mask: AttentionMask) -> torch.Tensor:
        self.k_LBTHD[layer].index_copy_(1, self.new_positions, k_BSHD)
        self.v_LBTHD[layer].index_copy_(1, self.new_positions, v_BSHD)
        return attend(q_BSHD, self.k_LBTHD[layer], self.v_LBTHD[layer], mask)

    def advance(self, n: int):
        """Move the cursor past the ``n`` tokens the last forward wrote."""
        self.cursor += n


class _CachedAttend:
    """One layer's ``attend``: through the cache, at that layer's slot."""

    def __init__(self, cache: KVCache, layer: int):
        self.cache, self.layer = cache, layer

    def __call__(self, q_BSHD, k_BSHD, v_BSHD, mask):
        return self.cache.write_and_attend(self.layer, q_BSHD, k_BSHD, v_BSHD, mask)
