"""Seam metrics: how visible is the wrap from the last frame back to the first, and any other jump of the cycle?

Everything here is generic over arrays of shape ``(T, ...)``: decoded uint8 frames ``(T, H, W, 3)`` as well as
float latents ``(T, C, H, W)`` (numpy arrays, or torch tensors, which are converted). A *step* is the mean absolute
difference between two consecutive frames; the *wrap* is the step from the last frame back to the first. The steps
of a loop form a cycle of T steps (the wrap included). Frame indices are 0-based throughout.

Every ratio is *local*: a step is compared with the median of the steps around it (:data:`NEIGHBOURS` on either
side, taken around the cycle), not with the clip's mean. Motion that speeds up and slows down smoothly (a swinging
pendulum) then has no seam anywhere, while a single step that stands out from its surroundings does. Because the
neighbourhoods wrap around the cycle, the largest local ratio of all (``cycle_ratio``) is the same for every
rotation of the loop: moving the wrap elsewhere (an anchored loop starting on its image, a plain clip rotated by a
few frames) cannot hide a jump from it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from loopui.media._arrays import as_numpy

logger = logging.getLogger(__name__)

# Steps on either side whose median is a step's reference: two latents' worth of frames for the 4x temporal VAEs,
# so a regular pattern inside each latent's frames is part of the reference, and robust to a seam two steps wide.
NEIGHBOURS = 4


@dataclass(frozen=True)
class LoopMetrics:
    """Seam statistics of one cycle of ``num_frames`` frames (0-based indices).

    Attributes:
        num_frames: T, the number of frames in the cycle.
        mean_step: mean over t = 0..T-2 of mean |x[t+1] - x[t]| (the wrap is not included).
        median_step: median of all T cyclic steps, the wrap included.
        max_step: the largest of them (0 for a still).
        wrap_step: mean |x[0] - x[T-1]|.
        seam_ratio: ``wrap_step`` / the median of the steps around it; about 1 when the seam is no bigger than the
            steps next to it, below 1 where the motion slows down at the wrap.
        interior_ratio: the largest local ratio of the other steps (each against the median of the steps around it):
            a hidden seam inside the cycle.
        cycle_ratio: the largest local ratio of all T steps, ``max(seam_ratio, interior_ratio)``: the same for
            every rotation of the cycle.
        worst_step: ``(a, b)`` frames of the step with the largest local ratio; ``(T-1, 0)`` when it is the wrap.
        worst_interior_step: ``(a, a+1)`` frames of the non-wrap step with the largest local ratio.
    """

    num_frames: int
    mean_step: float
    median_step: float
    max_step: float
    wrap_step: float
    seam_ratio: float
    interior_ratio: float
    cycle_ratio: float
    worst_step: tuple[int, int]
    worst_interior_step: tuple[int, int]

    def describe(self) -> str:
        """One line for people, e.g. ``"seam 1.03x the steps around it; largest jump between frames 31 and 32
        (1.41x)"``. Frame numbers are 0-based."""
        a, b = self.worst_step
        return (
            f"seam {self.seam_ratio:.2f}x the steps around it; "
            f"largest jump between frames {a} and {b} ({self.cycle_ratio:.2f}x)"
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-friendly dict (tuples become lists) for sidecar files."""
        d = asdict(self)
        d["worst_step"] = list(self.worst_step)
        d["worst_interior_step"] = list(self.worst_interior_step)
        return d


def _ratio(num: float, den: float) -> float:
    # A static stretch has no typical step to compare against: an equally static step is "as good as a step" (1.0),
    # any motion in it is infinitely worse than none.
    if den == 0.0:
        return 1.0 if num == 0.0 else math.inf
    return num / den


def cyclic_steps(frames: Any) -> np.ndarray:
    """The T steps of a cycle in float64: ``d[t]`` = mean |x[t+1] - x[t]| for t = 0..T-2 and ``d[T-1]`` = mean
    |x[0] - x[T-1]| (the wrap).

    Raises:
        ValueError: fewer than 2 frames, a non-numeric dtype, or NaN/inf values.
    """
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

    d = np.array([step(x[t], x[(t + 1) % num_frames]) for t in range(num_frames)], dtype=np.float64)
    if not np.isfinite(d).all():
        raise ValueError("frames contain NaN or infinite values")
    return d


def local_ratios(steps: np.ndarray, floor: float = 0.0) -> np.ndarray:
    """Each cyclic step divided by the median of the :data:`NEIGHBOURS` steps on either side of it (around the
    cycle, itself left out; fewer in a short cycle). Steps under ``floor`` count as ``floor``."""
    d = np.maximum(np.asarray(steps, dtype=np.float64), floor)
    num_steps = len(d)
    reach = max(1, min(NEIGHBOURS, (num_steps - 1) // 2))
    out = np.empty(num_steps, dtype=np.float64)
    for t in range(num_steps):
        around = sorted({(t + k) % num_steps for k in range(-reach, reach + 1)} - {t})
        out[t] = _ratio(float(d[t]), float(np.median(d[around])))
    return out


def seam_ratio(frames: Any) -> float:
    """The wrap step (mean |frame_last - frame_first|) divided by the median of the steps around it.

    About 1 means the seam is no bigger than the ordinary steps next to it; a visible jump gives >> 1; a wrap where
    the motion slows down gives < 1. A static clip gives 1.0 if the wrap is static too, else ``inf``.

    Args:
        frames: array-like of shape ``(T, ...)`` with T >= 2, e.g. uint8 ``(T, H, W, 3)`` or float latents
            ``(T, C, H, W)``; torch tensors are accepted.

    Raises:
        ValueError: fewer than 2 frames, a non-numeric dtype, or NaN/inf values.
    """
    return float(local_ratios(cyclic_steps(frames))[-1])


def loop_metrics(frames: Any, floor: float = 0.0) -> LoopMetrics:
    """Seam, interior and cycle ratios plus where the largest jumps of the cycle are (see :class:`LoopMetrics`,
    0-based indices).

    Args:
        frames: array-like of shape ``(T, ...)`` with T >= 2 (frames or latents, numpy or torch).
        floor: steps under it count as ``floor`` in the ratios (for pixels: a difference too small to see, so that
            codec noise on a still does not divide into absurd ratios); 0 for latents.

    Raises:
        ValueError: fewer than 2 frames, a non-numeric dtype, or NaN/inf values.
    """
    d = cyclic_steps(frames)
    num_frames = len(d)
    ratios = local_ratios(d, floor)
    interior = ratios[:-1]
    a = int(np.argmax(interior))
    # The wrap only counts as the worst step when it strictly beats every interior step.
    worst_step = (num_frames - 1, 0) if ratios[-1] > interior[a] else (a, a + 1)
    metrics = LoopMetrics(
        num_frames=num_frames,
        mean_step=float(d[:-1].mean()),
        median_step=float(np.median(d)),
        max_step=float(d.max()),
        wrap_step=float(d[-1]),
        seam_ratio=float(ratios[-1]),
        interior_ratio=float(interior[a]),
        cycle_ratio=float(ratios.max()),
        worst_step=worst_step,
        worst_interior_step=(a, a + 1),
    )
    logger.debug("loop metrics: %s", metrics)
    return metrics
