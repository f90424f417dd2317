"""Seam metrics: how visible is the wrap from the last frame back to the first?

Everything here is generic over arrays of shape ``(T, ...)``: decoded uint8 frames ``(T, H, W, 3)`` as well as
float latents ``(T, C, H, W)`` (numpy arrays, or torch tensors, which are converted). A *step* is the mean absolute
difference between two consecutive frames; the *wrap* is the step from the last frame back to the first.
Frame indices are 0-based throughout.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from loopui.media._arrays import as_numpy

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoopMetrics:
    """Seam statistics of one cycle of ``num_frames`` frames (0-based indices).

    Attributes:
        num_frames: T, the number of frames in the cycle.
        mean_step: mean over t = 0..T-2 of mean |x[t+1] - x[t]| (the wrap is not included).
        wrap_step: mean |x[0] - x[T-1]|.
        seam_ratio: ``wrap_step / mean_step``; about 1 when the seam is no bigger than an ordinary step.
        interior_ratio: largest non-wrap step / ``mean_step`` (same denominator as ``seam_ratio``).
        worst_step: ``(a, b)`` frames of the largest step of the whole cycle; ``(T-1, 0)`` when it is the wrap.
        worst_interior_step: ``(a, a+1)`` frames of the largest non-wrap step.
    """

    num_frames: int
    mean_step: float
    wrap_step: float
    seam_ratio: float
    interior_ratio: float
    worst_step: tuple[int, int]
    worst_interior_step: tuple[int, int]

    def describe(self) -> str:
        """One line for people, e.g. ``"seam 1.03x a typical step; largest jump between frames 31 and 32 (1.41x)"``.

        Frame numbers are 0-based.
        """
        a, b = self.worst_step
        worst_ratio = max(self.seam_ratio, self.interior_ratio)
        return (
            f"seam {self.seam_ratio:.2f}x a typical step; "
            f"largest jump between frames {a} and {b} ({worst_ratio:.2f}x)"
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-friendly dict (tuples become lists) for sidecar files."""
        d = asdict(self)
        d["worst_step"] = list(self.worst_step)
        d["worst_interior_step"] = list(self.worst_interior_step)
        return d


def _ratio(num: float, den: float) -> float:
    # A static clip has no typical step to compare against: an equally static seam is "as good as a step" (1.0),
    # any motion at the seam is infinitely worse than none.
    if den == 0.0:
        return 1.0 if num == 0.0 else math.inf
    return num / den


def _steps(frames: Any) -> tuple[np.ndarray, float]:
    """Return (d, w): d[t] = mean |x[t+1] - x[t]| for t = 0..T-2 and w = mean |x[0] - x[T-1]|, in float64."""
    x = as_numpy(frames)
    if x.ndim < 1:
        raise ValueError(f"frames must have shape (T, ...), got a scalar of shape {x.shape}")
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise ValueError(f"frames must be an integer or float array, got dtype {x.dtype}")
    num_frames = x.shape[0]
    if num_frames < 2:
        raise ValueError(f"seam metrics need at least 2 frames, got {num_frames}")
    if x.size == 0:
        raise ValueError(f"frames are empty: shape {x.shape}")

    # One pair of frames at a time in float64: uint8 differences must not wrap around, and a whole clip in
    # float64 (49 x 480 x 720 x 3) would be hundreds of MB.
    def step(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.abs(b.astype(np.float64) - a.astype(np.float64)).mean())

    d = np.array([step(x[t], x[t + 1]) for t in range(num_frames - 1)], dtype=np.float64)
    w = step(x[num_frames - 1], x[0])
    if not (np.isfinite(d).all() and math.isfinite(w)):
        raise ValueError("frames contain NaN or infinite values")
    return d, w


def seam_ratio(frames: Any) -> float:
    """Mean |frame_last - frame_first| divided by the mean over t of mean |frame_{t+1} - frame_t|.

    About 1 means the seam is no bigger than an ordinary step between frames; a visible jump gives >> 1.
    A static clip gives 1.0 if the wrap is static too, else ``inf``.

    Args:
        frames: array-like of shape ``(T, ...)`` with T >= 2, e.g. uint8 ``(T, H, W, 3)`` or float latents
            ``(T, C, H, W)``; torch tensors are accepted.

    Raises:
        ValueError: fewer than 2 frames, a non-numeric dtype, or NaN/inf values.
    """
    d, w = _steps(frames)
    return _ratio(w, float(d.mean()))


def loop_metrics(frames: Any) -> LoopMetrics:
    """Seam ratio plus where the largest jumps of the cycle are (see :class:`LoopMetrics`, 0-based indices).

    Args:
        frames: array-like of shape ``(T, ...)`` with T >= 2 (frames or latents, numpy or torch).

    Raises:
        ValueError: fewer than 2 frames, a non-numeric dtype, or NaN/inf values.
    """
    d, w = _steps(frames)
    num_frames = len(d) + 1
    mean_step = float(d.mean())
    a = int(np.argmax(d))
    # The wrap only counts as the worst step when it strictly beats every interior step.
    worst_step = (num_frames - 1, 0) if w > d[a] else (a, a + 1)
    metrics = LoopMetrics(
        num_frames=num_frames,
        mean_step=mean_step,
        wrap_step=w,
        seam_ratio=_ratio(w, mean_step),
        interior_ratio=_ratio(float(d[a]), mean_step),
        worst_step=worst_step,
        worst_interior_step=(a, a + 1),
    )
    logger.debug("loop metrics: %s", metrics)
    return metrics
