"""RoPE-Interp: NTK-aware scaling of the temporal rotary base for cycles longer than the model was trained on.

The formula and the 1-D tables are shared; how a family's 3-D table is built and where its temporal channels sit
lives in the family modules (``families/cogvideox.py``: the pipeline's table; ``families/wan.py``: the
transformer's ``rope`` module).
"""

from __future__ import annotations

import torch

DEFAULT_THETA = 10000.0


def ntk_theta(theta: float, rope_scale: float, temporal_dim: int) -> float:
    """NTK-aware base: ``theta * s ** (d_t / (d_t - 2))``; ``s = 1`` returns ``theta`` unchanged."""
    if rope_scale < 1.0:
        raise ValueError(f"rope_scale must be >= 1, got {rope_scale!r}")
    if rope_scale == 1.0:
        return float(theta)
    if temporal_dim <= 2:
        raise ValueError(f"temporal rotary dimension {temporal_dim} is too small for NTK scaling")
    return float(theta) * float(rope_scale) ** (temporal_dim / (temporal_dim - 2))


def temporal_frequencies(num_frames: int, temporal_dim: int, theta: float,
                         freqs_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables ``(num_frames, d_t)`` in diffusers' interleaved layout (each frequency repeated twice)."""
    from diffusers.models.embeddings import get_1d_rotary_pos_embed

    if freqs_dtype == torch.float32:
        positions = torch.arange(num_frames, dtype=torch.float32)
        return get_1d_rotary_pos_embed(temporal_dim, positions, theta=theta, use_real=True)
    return get_1d_rotary_pos_embed(temporal_dim, num_frames, theta=theta, use_real=True,
                                   repeat_interleave_real=True, freqs_dtype=freqs_dtype)
