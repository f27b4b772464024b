"""Decoder of the Llama 3 / Qwen2 / Qwen3 family: RMSNorm, GQA, RoPE, SwiGLU.

Options cover the family's differences: qkv bias (Qwen2), q/k RMSNorm (Qwen3), Llama 3.1 RoPE
scaling, tied embeddings. TextModel is the decoder alone as a model of the text-only family.
Single-device code; parallelisms are applied from outside (titan_mm/parallel).
"""

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from titan_mm.data.batch import BatchShape
from titan_mm.data.image import VisionInputSpec
from titan_mm.models.attention import attend, segment_mask
from titan_mm.models.rope import RopeScaling, apply_rope, rope_attention_scaling, rope_cos_sin, rope_inv_freq


@dataclass
class DecoderArgs:
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 64
    ffn_hidden_dim: int = 768
    vocab_size: int = 512
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    """Long-context frequency scaling: Llama 3.1's or YaRN; None = plain RoPE."""
    max_position_embeddings: int = 4096
    """Context length recorded in HF config.json; the model itself has no length limit."""
    qkv_bias: bool = False
    qk_norm: bool = False
    tie_embeddings: bool = False
    mrope_section: tuple[int, ...] | None = None
    """M-RoPE: frequencies per (t, h, w) axis, summing to head_dim / 2; position_ids are [B, 3, S]."""
    mrope_interleaved: bool = False
    """M-RoPE layout: interleaved t, h, w frequencies (Qwen3-VL) instead of contiguous sections."""
    init_std: float = 0.02
    attention_backend: str = "sdpa"
    """Attention kernel: sdpa, flex or varlen (titan_mm/models/attention.py); set from
    model.attention_backend by the trainer."""
    causal: bool = True
    """Attention within each document: causal, or bidirectional (False); set from the training
    objective by the trainer (titan_mm/objectives)."""


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_f = x.float()
        x_f = x_f * torch.rsqrt(x_f.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x_f.to(x.dtype)

    def init_weights(self):
        nn.init.ones_(self.weight)


class Attention(nn.Module):
    def __init__(self, args: DecoderArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=args.qkv_bias)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.q_norm = RMSNorm(args.head_dim, args.norm_eps) if args.qk_norm else None
        self.k_norm = RMSNorm(args.head_dim, args.norm_eps) if args.qk_norm else None
        # a callable attribute: sequence parallelism swaps in its own around the kernel
        # (titan_mm/parallel/sequence.py)
        self.attend = attend

    def forward(self, x_BSD, cos, sin, mask):
        B, S, _ = x_BSD.shape
        # -1 instead of n_heads: tensor parallelism leaves each rank a slice of the heads
        q = self.wq(x_BSD).view(B, S, -1, self.head_dim)
        k = self.wk(x_BSD).view(B, S, -1, self.head_dim)
        v = self.wv(x_BSD).view(B, S, -1, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return self.wo(self.attend(q, k, v, mask).reshape(B, S, -1))

    def init_weights(self, std: float, out_std: float):
        for lin in (self.wq, self.wk, self.wv):
            nn.init.trunc_normal_(lin.weight, std=std)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        nn.init.trunc_normal_(self.wo.weight, std=out_std)
        for norm in (self.q_norm, self.k_norm):
            if norm is not None:
                norm.init_weights()


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def init_weights(self, std: float, out_std: float):
        nn.init.trunc_normal_(self.w1.weight, std=std)
        nn.init.trunc_normal_(self.w3.weight, std=std)
        nn.init.trunc_normal_(self.w2.weight, std=out_std)


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: DecoderArgs):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
        # depth-scaled init of the residual branches' output projections
        self.out_std = args.init_std / (2 * (layer_id + 1)) ** 0.5

    def forward(self, h, cos, sin, mask):
        h = h + self.attention(self.attention_norm(h), cos, sin, mask)
        return h + self.feed_forward(self.ffn_norm(h))

    def init_weights(self, std: float):
        self.attention_norm.init_weights()
        self.ffn_norm.init_weights()
        self.attention.init_weights(std, self.out_std)
        self.feed_forward.init_weights(std, self.out_std)


class Decoder(nn.Module):
    """Token embeddings -> blocks -> norm: the final hidden states. The output head's weight is
    held here (``head_weight``) and applied by the training objective (titan_mm/objectives) or
    ``logits``.

    A pipeline stage may lack tok_embeddings (not first) or norm and output (not last); layers is a
    ModuleDict so stages keep their original layer names.
    """

    def __init__(self, args: DecoderArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(i, args) for i in range(args.n_layers)})
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = None if args.tie_embeddings else nn.Linear(args.dim, args.vocab_size, bias=False)
        inv_freq = rope_inv_freq(args.head_dim, args.rope_theta, scaling=args.rope_scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        # a callable attribute: sequence parallelism swaps in its own, which masks this rank's
        # share of each row (titan_mm/parallel/sequence.py)
        self.build_mask = segment_mask

    def forward(self, h_BSD: torch.Tensor, position_ids: torch.Tensor, document_ids_BS: torch.Tensor,
                layer_additions: list[torch.Tensor] | None = None,
                document_lengths: torch.Tensor | None = None,
                after_layer: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """h_BSD: input embeddings (or token ids [B, S] when this stage has tok_embeddings).
        position_ids: [B, S], or [B, 3, S] with M-RoPE. layer_additions[i] ([B, S, D]) is added to
        the output of layer i (DeepStack visual features). document_lengths [B, K]: each row's
        document (and padding) lengths, for the varlen attention backend. after_layer(i, h_BSD), when
        given, maps the output of layer i (Cambrian's SVA layers inside the decoder). Returns the
        final hidden states [B, S, D] (after the final norm; before it on a pipeline stage without
        one)."""
        if self.tok_embeddings is not None and not h_BSD.is_floating_point():
            h_BSD = self.tok_embeddings(h_BSD)
        cos, sin = rope_cos_sin(position_ids, self.inv_freq, self.args.mrope_section,
                                self.args.mrope_interleaved, rope_attention_scaling(self.args.rope_scaling))
        mask = self.build_mask(document_ids_BS, causal=self.args.causal, backend=self.args.attention_backend,
                               segment_lengths_BK=document_lengths)
        for i, (name, layer) in enumerate(self.layers.items()):
            h_BSD = layer(h_BSD, cos, sin, mask)
            if layer_additions is not None and i < len(layer_additions):
                h_BSD = h_BSD + layer_additions[i]
            if after_layer is not None:
                h_BSD = after_layer(int(name), h_BSD)
        if self.norm is None:  # not the last pipeline stage
            return h_BSD
        return self.norm(h_BSD)

    def head_weight(self) -> torch.Tensor:
        """The output head's weight [V, D] (the token embeddings when tied)."""
        # tied embeddings reuse tok_embeddings.weight instead of sharing a Parameter: sharing does
        # not survive to_empty() or FSDP sharding
        return self.tok_embeddings.weight if self.args.tie_embeddings else self.output.weight

    def logits(self, h_BSD: torch.Tensor) -> torch.Tensor:
        """[B, S, V] logits of final hidden states (evaluation and sampling; training leaves the
        head to the objective, which never materialises all logits)."""
        return F.linear(h_BSD, self.head_weight())

    @torch.no_grad()
    def init_weights(self):
        self.inv_freq.copy_(rope_inv_freq(self.args.head_dim, self.args.rope_theta,
                                          scaling=self.args.rope_scaling))
        std = self.args.init_std
        if self.tok_embeddings is not None:
            nn.init.normal_(self.tok_embeddings.weight, std=std)
        for layer in self.layers.values():
            layer.init_weights(std)
        if self.norm is not None:
            self.norm.init_weights()
        if self.output is not None:
            nn.init.trunc_normal_(self.output.weight, std=self.args.dim ** -0.5)


@dataclass
class TextArgs:
    decoder: DecoderArgs = field(default_factory=DecoderArgs)
    vision_input: VisionInputSpec = field(default_factory=lambda: VisionInputSpec(
        patch_size=32, temporal_patch_size=1, spatial_merge_size=2, image_mean=(0.5, 0.5, 0.5),
        image_std=(0.5, 0.5, 0.5)))
    """How the data pipeline cuts the images of mixed datasets; a text model never reads the pixels,
    so a coarse grid keeps the placeholder tokens few (one per 64 x 64 pixels)."""


class TextModel(nn.Module):
    """A Llama / Qwen language model on the multimodal batch layout: the media inputs every batch
    carries (pixel_values, grid_thw, image_token_index) are accepted and ignored, so image
    placeholders are trained as ordinary tokens."""

    def __init__(self, args: TextArgs):
        super().__init__()
        self.args = args
        self.decoder = Decoder(args.decoder)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, document_ids: torch.Tensor,
                pixel_values: torch.Tensor | None = None, grid_thw: torch.Tensor | None = None,
                image_token_index: torch.Tensor | None = None, document_lengths: torch.Tensor | None = None,
                frame_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids/position_ids/document_ids [B, S]. Returns the final hidden states [B, S, D]."""
        return self.decoder(input_ids, position_ids, document_ids, document_lengths=document_lengths)

    def init_weights(self):
        self.decoder.init_weights()


def training_flops(args: TextArgs, shape: BatchShape) -> float:
    """Matmul FLOPs of one training step (3 x forward) over valid tokens; attention counts causal
    (bidirectional: all) pairs inside each document."""
    d = args.decoder
    q_dim, kv_dim = d.n_heads * d.head_dim, d.n_kv_heads * d.head_dim
    linear = d.n_layers * (2 * d.dim * q_dim + 2 * d.dim * kv_dim + 3 * d.dim * d.ffn_hidden_dim)
    linear += d.dim * d.vocab_size
    attention = d.n_layers * (2 if d.causal else 4) * q_dim * shape.doc_len_sq_sum  # causal: half of 4 S^2
    return 3.0 * (2 * linear * shape.tokens + attention)
