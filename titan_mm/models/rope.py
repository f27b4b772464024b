"""Rotary position embeddings in the rotate-half layout used by HF Llama/Qwen checkpoints."""

import torch


def rope_inv_freq(head_dim: int, theta: float, device=None) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))


def rope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape [*position_ids.shape, 2 * len(inv_freq)], computed in fp32."""
    freqs = position_ids[..., None].float() * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x_BSHD: torch.Tensor, cos_BSD: torch.Tensor, sin_BSD: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, S, H, head_dim] by cos/sin [B, S, head_dim] (fp32 math, input dtype out)."""
    x = x_BSHD.float()
    cos, sin = cos_BSD[:, :, None], sin_BSD[:, :, None]
    return (x * cos + _rotate_half(x) * sin).to(x_BSHD.dtype)
