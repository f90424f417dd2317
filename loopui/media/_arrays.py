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


def as_frames(frames: Any, minimum: int = 2) -> np.ndarray:
    """Frames as ``(F, H, W, 3)`` uint8; at least ``minimum`` of them (``ValueError`` otherwise)."""
    from loopui.media.export import _to_uint8_frames

    x = _to_uint8_frames(frames)
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
