"""Array helpers shared by the media modules (private)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def as_numpy(x: Any) -> np.ndarray:
    """Return ``x`` as a numpy array; torch tensors are detached and moved to the CPU first.

    Duck-typed on ``.detach`` so that this leaf module never imports torch. Floating tensors go through
    ``.float()`` because numpy has no bfloat16; integer tensors (uint8 frames) keep their dtype.
    """
    if hasattr(x, "detach"):
        t = x.detach().cpu()
        if t.is_floating_point():
            t = t.float()
        return np.asarray(t)
    return np.asarray(x)


def to_uint8_frames(frames: Any) -> np.ndarray:
    """Validate frames of shape (F, H, W, 3): uint8 is kept, float in [0, 1] is scaled to uint8."""
    try:
        x = as_numpy(frames)
    except ValueError as e:  # numpy refuses ragged lists of frames
        raise ValueError(f"frames must all have the same shape: {e}") from e
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"frames must have shape (F, H, W, 3), got {x.shape}")
    if x.size == 0:
        raise ValueError(f"no frames to use: shape {x.shape}")
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"frames must be uint8 or float in [0, 1], got dtype {x.dtype}")
    if not np.isfinite(x).all():
        raise ValueError("float frames contain NaN or infinite values")
    lo, hi = float(x.min()), float(x.max())
    # A little slack for rounding noise from the VAE; anything further off is a caller mix-up ([-1, 1] or 0..255).
    if lo < -0.01 or hi > 1.01:
        raise ValueError(f"float frames must be in [0, 1], got values from {lo:.3g} to {hi:.3g}")
    return np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


def as_frames(frames: Any, minimum: int = 2) -> np.ndarray:
    """Frames as ``(F, H, W, 3)`` uint8; at least ``minimum`` of them (``ValueError`` otherwise)."""
    x = to_uint8_frames(frames)
    if x.shape[0] < minimum:
        raise ValueError(f"scores need at least {minimum} frames, got {x.shape[0]}")
    return x


def check_fps(fps: Any) -> None:
    """A positive, finite frame rate (``ValueError`` naming ``fps`` otherwise)."""
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
        raise ValueError(f"fps must be a positive number, got {fps!r}")


def luma(frame: np.ndarray) -> np.ndarray:
    """BT.601 luma in float64, 0..255."""
    f = frame.astype(np.float64)
    return 0.299 * f[..., 0] + 0.587 * f[..., 1] + 0.114 * f[..., 2]
