"""Rotary position embeddings in the rotate-half layout used by HF Llama/Qwen checkpoints.

Plain RoPE takes position ids [B, S]. Multimodal RoPE (M-RoPE, Qwen2-VL and later) takes [B, 3, S]
(temporal, height, width ids) and gives each axis its own share of the frequencies: contiguous
sections (Qwen2/2.5-VL) or interleaved ones (Qwen3-VL).
"""

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama 3.1's long-context RoPE ("rope_type": "llama3" in HF configs): low frequencies are
    slowed by ``factor``, high ones kept, and those between blended."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class YarnRopeScaling:
    """YaRN ("rope_type": "yarn"; what Qwen's model cards add for inputs past the original context):
    frequencies that turn more than beta_fast times over the original context are kept, those that
    turn fewer than beta_slow times are divided by ``factor``, a linear ramp over the dimensions
    between; cos and sin are multiplied by attention_factor. As transformers computes it."""

    factor: float = 4.0
    original_max_position_embeddings: int = 32768
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    """None = 0.1 ln(factor) + 1 (the YaRN paper's, and transformers' default)."""
    truncate: bool = True
    """Round the ramp's ends outwards to whole dimensions (transformers' default)."""


RopeScaling = Llama3RopeScaling | YarnRopeScaling


def rope_inv_freq(head_dim: int, theta: float, device=None, scaling: RopeScaling | None = None) -> torch.Tensor:
    pos_freqs = theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    if isinstance(scaling, YarnRopeScaling):
        return _yarn_scaled(pos_freqs, theta, head_dim, scaling)
    return 1.0 / pos_freqs if scaling is None else _llama3_scaled(1.0 / pos_freqs, scaling)


def rope_attention_scaling(scaling: RopeScaling | None) -> float:
    """The factor on cos and sin (YaRN's attention temperature; 1 otherwise)."""
    if not isinstance(scaling, YarnRopeScaling):
        return 1.0
    if scaling.attention_factor is not None:
        return scaling.attention_factor
    return 0.1 * math.log(scaling.factor) + 1.0 if scaling.factor > 1 else 1.0


def _llama3_scaled(inv_freq: torch.Tensor, s: Llama3RopeScaling) -> torch.Tensor:
    """Wavelengths above original_max / low_freq_factor are stretched by ``factor``, those below
    original_max / high_freq_factor kept, and those between interpolated linearly in 1 / wavelength."""
    wavelen = 2 * math.pi / inv_freq
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor)
    smooth = smooth.clamp(0.0, 1.0)
    return (1 - smooth) * inv_freq / s.factor + smooth * inv_freq


def _yarn_scaled(pos_freqs: torch.Tensor, theta: float, head_dim: int, s: YarnRopeScaling) -> torch.Tensor:
    """Dimension d keeps its frequency 1 / pos_freqs[d] below the ramp (many turns over the original
    context), takes it divided by ``factor`` above it, and a linear blend across it."""
    def dim_turning(turns: float) -> float:  # the dimension whose wavelength fits ``turns`` times
        wavelength = s.original_max_position_embeddings / turns
        return head_dim * math.log(wavelength / (2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_turning(s.beta_fast), dim_turning(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    dims = torch.arange(head_dim // 2, dtype=torch.float32, device=pos_freqs.device)
    ramp = ((dims - low) / (high - low)).clamp(0, 1)
    # written as transformers writes it, so the frequencies agree to the last bit
    return 1.0 / (s.factor * pos_freqs) * ramp + 1.0 / pos_freqs * (1 - ramp)


def rope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor,
                 mrope_section: tuple[int, ...] | None = None,
                 mrope_interleaved: bool = False, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [B, S, head_dim] in fp32 from position ids [B, S], or [B, 3, S] with mrope_section;
    both multiplied by ``scale`` (rope_attention_scaling)."""
    freqs = position_ids[..., None].float() * inv_freq  # [B, S, hd/2] or [B, 3, S, hd/2]
    if mrope_section is not None:
        freqs = _mrope_interleaved(freqs, mrope_section) if mrope_interleaved else _mrope_sections(
            freqs, mrope_section)
    emb = torch.cat([freqs, freqs], dim=-1)
    if scale == 1.0:
        return emb.cos(), emb.sin()
    return emb.cos() * scale, emb.sin() * scale


def rope_2d_cos_sin(grid_NL3: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D rotary of ViT patches (Qwen-VL): the first half of each head's frequencies rotate by the
    patch row, the second by its column. cos/sin [N, L, head_dim] in fp32 (rotate-half layout)."""
    hw_NL2 = grid_NL3[..., 1:].clamp(min=0).float()
    freqs_NLF = (hw_NL2[..., None] * inv_freq).flatten(-2)  # (h freqs, w freqs)
    emb = torch.cat([freqs_NLF, freqs_NLF], dim=-1)
    return emb.cos(), emb.sin()


def _mrope_sections(freqs_B3SF: torch.Tensor, section: tuple[int, ...]) -> torch.Tensor:
    """Frequency chunk i (sizes ``section``) takes its angle from axis i (t, h, w)."""
    chunks = freqs_B3SF.split(list(section), dim=-1)
    return torch.cat([chunk[:, i] for i, chunk in enumerate(chunks)], dim=-1)


def _mrope_interleaved(freqs_B3SF: torch.Tensor, section: tuple[int, ...]) -> torch.Tensor:
    """Frequencies cycle t, h, w, t, h, w, ...; h and w each take section[1] / section[2] slots."""
    out = freqs_B3SF[:, 0].clone()
    for axis in (1, 2):
        idx = slice(axis, section[axis] * 3, 3)
        out[..., idx] = freqs_B3SF[:, axis, :, idx]
    return out


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x_BSHD: torch.Tensor, cos_BSD: torch.Tensor, sin_BSD: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, S, H, head_dim] by cos/sin [B, S, head_dim] (fp32 math, input dtype out)."""
    x = x_BSHD.float()
    cos, sin = cos_BSD[:, :, None], sin_BSD[:, :, None]
    return (x * cos + _rotate_half(x) * sin).to(x_BSHD.dtype)
