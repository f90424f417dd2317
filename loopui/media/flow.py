"""Optical-flow metrics of a played loop: VBench's motion smoothness and dynamic degree, with weight-free TV-L1 flow
instead of VBench's networks (the definitions and how they differ are in :mod:`loopui.media.scores`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from loopui.media._arrays import as_frames, check_fps, luma

# Optical flow is computed on frames scaled down to this short side: VBench's thresholds are proportional to size,
# and TV-L1 at 480x720 costs seconds per pair on a CPU.
FLOW_SHORT_SIDE = 128
# Optical flow needs a little room.
MIN_FLOW_SIDE = 16
# VBench dynamic degree: 6 pixels at a 256-pixel short side and 8 fps; the top 5 % of flow magnitudes.
DYNAMIC_THRESHOLD_PX = 6.0
DYNAMIC_REFERENCE_SIDE = 256.0
DYNAMIC_REFERENCE_FPS = 8.0
DYNAMIC_TOP_FRACTION = 0.05
DEFAULT_FPS = 8.0


def _flow_size(height: int, width: int) -> tuple[int, int]:
    """(h, w) for flow: the short side brought down to FLOW_SHORT_SIDE (never up), aspect kept."""
    scale = min(1.0, FLOW_SHORT_SIDE / min(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def _downscale(gray: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    if gray.shape == size:
        return gray.astype(np.float32) / 255.0
    image = Image.fromarray(gray.astype(np.float32), mode="F")
    return np.asarray(image.resize((size[1], size[0]), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0


def _tvl1(reference: np.ndarray, moving: np.ndarray) -> np.ndarray:
    """TV-L1 flow ``(2, h, w)`` (rows, columns) with moving(x + flow(x)) ~ reference(x)."""
    from skimage.registration import optical_flow_tvl1

    return np.asarray(optical_flow_tvl1(reference, moving), dtype=np.float32)


def _warp(frame: np.ndarray, displacement: np.ndarray) -> np.ndarray:
    """``frame(y + displacement(y))`` for an ``(H, W, 3)`` frame and a ``(2, H, W)`` displacement (bilinear)."""
    from scipy.ndimage import map_coordinates

    height, width = frame.shape[:2]
    rows, cols = np.meshgrid(np.arange(height, dtype=np.float32), np.arange(width, dtype=np.float32), indexing="ij")
    coords = np.stack([rows + displacement[0], cols + displacement[1]])
    f = frame.astype(np.float32)
    return np.stack([map_coordinates(f[..., c], coords, order=1, mode="nearest") for c in range(f.shape[-1])], -1)


def _upscale_flow(flow: np.ndarray, height: int, width: int) -> np.ndarray:
    """A flow computed at (h, w) as a flow of the full (height, width) frame: resized and its lengths scaled."""
    from PIL import Image

    h, w = flow.shape[1:]
    if (h, w) == (height, width):
        return flow
    out = [np.asarray(Image.fromarray(flow[i], mode="F").resize((width, height), Image.Resampling.BILINEAR))
           for i in range(2)]
    return np.stack([out[0] * (height / h), out[1] * (width / w)]).astype(np.float32)


def _check_flow_size(x: np.ndarray) -> None:
    if min(x.shape[1:3]) < MIN_FLOW_SIDE:
        raise ValueError(f"optical flow needs frames of at least {MIN_FLOW_SIDE}x{MIN_FLOW_SIDE} pixels, "
                         f"got {x.shape[1]}x{x.shape[2]}")


def motion_smoothness(frames: Any) -> float:
    """VBench motion smoothness with a weight-free interpolator (see the module table): each odd frame is re-created
    from its two neighbours by warping them half way along a TV-L1 flow, score = (255 - mean |error|) / 255.

    Raises ``ValueError`` for fewer than 3 frames or frames under 16 pixels on a side.
    """
    x = as_frames(frames, minimum=3)
    _check_flow_size(x)
    height, width = x.shape[1:3]
    size = _flow_size(height, width)
    small = {t: _downscale(luma(x[t]), size) for t in range(0, len(x), 2)}
    errors = []
    for t in range(1, len(x) - 1, 2):
        # A point at p in frame t-1 sits at p + flow(p) in frame t+1, so at p + flow/2 in frame t; reading each
        # neighbour half way along the flow (the flow taken at the output pixel) re-creates frame t.
        flow = _upscale_flow(_tvl1(small[t - 1], small[t + 1]), height, width)
        middle = 0.5 * _warp(x[t - 1], -0.5 * flow) + 0.5 * _warp(x[t + 1], 0.5 * flow)
        predicted = np.clip(np.round(middle), 0, 255)
        errors.append(float(np.mean(np.abs(predicted - x[t].astype(np.float32)))))
    return (255.0 - float(np.mean(errors))) / 255.0


def dynamic_degree(frames: Any, fps: float = DEFAULT_FPS) -> tuple[bool, float]:
    """VBench dynamic degree with TV-L1 instead of RAFT (see the module table).

    Returns:
        ``(moving, flow_magnitude)``: whether enough consecutive pairs exceed VBench's threshold, and the mean over
        pairs of the top-5 % flow magnitudes in pixels at a 256-pixel short side.

    Raises:
        ValueError: fewer than 2 frames (after sub-sampling to about 8 fps), frames under 16 pixels, bad fps.
    """
    check_fps(fps)
    x = as_frames(frames)
    _check_flow_size(x)
    x = x[::max(1, round(fps / DYNAMIC_REFERENCE_FPS))]
    if len(x) < 2:
        raise ValueError(f"dynamic degree needs at least 2 frames at about 8 fps, got {len(x)}")
    size = _flow_size(*x.shape[1:3])
    to_reference = DYNAMIC_REFERENCE_SIDE / min(size)  # flow pixels -> pixels at a 256-pixel short side
    small = [_downscale(luma(f), size) for f in x]
    tops = []
    for a, b in zip(small[:-1], small[1:]):
        magnitude = np.hypot(*_tvl1(a, b)).ravel() * to_reference
        count = max(1, int(magnitude.size * DYNAMIC_TOP_FRACTION))
        tops.append(float(np.mean(np.partition(magnitude, magnitude.size - count)[-count:])))
    threshold = DYNAMIC_THRESHOLD_PX * max(1.0, DYNAMIC_REFERENCE_FPS / fps)
    needed = max(1, round(4 * len(x) / 16))
    moving = sum(top > threshold for top in tops) >= needed
    return bool(moving), float(np.mean(tops))


# -- CLIP ---------------------------------------------------------------------------------------------------------
