"""RoPE-Interp: NTK-aware scaling of the temporal rotary base for cycles longer than the model was trained on."""

from __future__ import annotations

import logging
from typing import Callable

import torch

logger = logging.getLogger(__name__)

DEFAULT_THETA = 10000.0


def temporal_rope_dim(attention_head_dim: int) -> int:
    """Rotary channels CogVideoX gives to time (``d_t``): a quarter of the head dimension (16 for CogVideoX-5b)."""
    return attention_head_dim // 4


def ntk_theta(theta: float, rope_scale: float, temporal_dim: int) -> float:
    """NTK-aware base: ``theta * s ** (d_t / (d_t - 2))``; ``s = 1`` returns ``theta`` unchanged."""
    if rope_scale < 1.0:
        raise ValueError(f"rope_scale must be >= 1, got {rope_scale!r}")
    if rope_scale == 1.0:
        return float(theta)
    if temporal_dim <= 2:
        raise ValueError(f"temporal rotary dimension {temporal_dim} is too small for NTK scaling")
    return float(theta) * float(rope_scale) ** (temporal_dim / (temporal_dim - 2))


def temporal_frequencies(num_frames: int, temporal_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables ``(num_frames, d_t)`` in diffusers' interleaved layout (each frequency repeated twice)."""
    from diffusers.models.embeddings import get_1d_rotary_pos_embed

    positions = torch.arange(num_frames, dtype=torch.float32)
    return get_1d_rotary_pos_embed(temporal_dim, positions, theta=theta, use_real=True)


def replace_temporal_rope(
    freqs: tuple[torch.Tensor, torch.Tensor], num_frames: int, temporal_dim: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Swap the temporal channels of a CogVideoX 3D rotary table for ones built with base ``theta``.

    CogVideoX lays its table out as ``(T * H * W, d_t + d_h + d_w)``, time-major, temporal channels first; the spatial
    channels are left exactly as they were.
    """
    cos, sin = freqs
    rows, dim = cos.shape
    if rows % num_frames:
        raise ValueError(f"rotary table of {rows} rows does not split into {num_frames} frames")
    t_cos, t_sin = temporal_frequencies(num_frames, temporal_dim, theta)
    out = []
    for table, temporal in ((cos, t_cos), (sin, t_sin)):
        table = table.clone().view(num_frames, rows // num_frames, dim)
        table[:, :, :temporal_dim] = temporal.to(device=table.device, dtype=table.dtype)[:, None, :]
        out.append(table.view(rows, dim))
    return out[0], out[1]


def scaled_rope_preparer(pipe, rope_scale: float) -> Callable:
    """A drop-in for ``pipe._prepare_rotary_positional_embeddings`` that applies NTK scaling to time only.

    ``rope_scale == 1`` returns the stock function's tables untouched (bit-for-bit).
    """
    stock = pipe._prepare_rotary_positional_embeddings
    temporal_dim = temporal_rope_dim(pipe.transformer.config.attention_head_dim)
    theta = ntk_theta(DEFAULT_THETA, rope_scale, temporal_dim)

    def prepare(height: int, width: int, num_frames: int, device: torch.device):
        freqs = stock(height, width, num_frames, device)
        if rope_scale == 1.0:
            return freqs
        return replace_temporal_rope(freqs, num_frames, temporal_dim, theta)

    return prepare
