"""Export frames to looping video files, read them back, write JSON sidecars and seam strips.

``export_video`` is a pure function from frames to a file; the format is chosen by the file suffix:

- ``.mp4``: H.264 (libx264, CRF 18), yuv420p, ``+faststart`` so browsers start playing before the download ends.
  yuv420p needs even sizes, so an odd width or height is padded by one pixel (the last row/column is repeated);
  even sizes are kept exactly. MP4 has no loop flag: the player loops it (``gr.Video(loop=True)``).
- ``.gif`` and ``.webp``: loop forever (``loop=0``). GIF delays are stored in 10 ms ticks, so per-frame delays
  alternate (e.g. 120/130 ms at 8 fps) to keep the total length exact; browsers slow down delays under 20 ms, so
  a GIF plays at most at 50 fps. The GIF encoder merges identical consecutive frames (timing is kept). GIFs share one
  palette across frames, without dithering, so still pixels stay exactly still.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from loopui.media._arrays import to_uint8_frames

logger = logging.getLogger(__name__)

SUPPORTED_SUFFIXES: tuple[str, ...] = (".mp4", ".gif", ".webp")

# x264's conventional "visually lossless" setting; loops are short, so quality wins over size.
MP4_CRF = 18
WEBP_QUALITY = 90
# Browsers treat GIF delays below 2 centiseconds as 100 ms.
GIF_MIN_DELAY_MS = 20
SEPARATOR_COLOR = (255, 0, 255)
SEPARATOR_WIDTH = 2


def _frame_durations_ms(num_frames: int, fps: float, tick_ms: int, min_ms: int) -> list[int]:
    """Per-frame durations in whole ticks whose running total stays as close as possible to i / fps."""
    frame_ms = 1000.0 / fps
    if frame_ms < min_ms:
        logger.warning("%.3g fps is too fast for this format; playing at %.3g fps", fps, 1000.0 / min_ms)
        return [min_ms] * num_frames
    ends = [round((i + 1) * frame_ms / tick_ms) * tick_ms for i in range(num_frames)]
    return [max(min_ms, e - s) for s, e in zip([0, *ends[:-1]], ends)]


def _pad_to_even(x: np.ndarray) -> np.ndarray:
    pad_h, pad_w = x.shape[1] % 2, x.shape[2] % 2
    if pad_h or pad_w:
        logger.info("padding %dx%d frames by one pixel to an even size for yuv420p", x.shape[2], x.shape[1])
        x = np.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return x


def export_video(frames: Any, path: str | os.PathLike[str], fps: float) -> Path:
    """Write frames to a looping video file; the format follows the suffix (see :data:`SUPPORTED_SUFFIXES`).

    Args:
        frames: uint8 array ``(F, H, W, 3)``, or float in [0, 1] (scaled to uint8); torch tensors are accepted.
        path: output file ``.mp4`` (H.264 yuv420p, faststart; odd sizes padded by one pixel to even),
            ``.gif`` or ``.webp`` (both loop forever). Parent directories are created.
        fps: frames per second, > 0.

    Returns:
        The path written.

    Raises:
        ValueError: unsupported suffix, bad fps, or frames of the wrong shape, dtype or range.
    """
    import imageio.v3 as iio  # lazy: keeps `import loopui.media` light

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise ValueError(f"unsupported video suffix {suffix!r} in {path}; use one of {', '.join(SUPPORTED_SUFFIXES)}")
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    x = to_uint8_frames(frames)
    num_frames = x.shape[0]

    path.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename, so a failed encode never leaves a half-written file under the real name.
    partial = path.with_name(f"{path.stem}.partial{suffix}")
    try:
        if suffix == ".mp4":
            # Name the plugin: with PyAV installed imageio would otherwise pick it, and it takes other arguments.
            iio.imwrite(
                partial,
                _pad_to_even(x),
                plugin="FFMPEG",
                fps=fps,
                codec="libx264",
                pixelformat="yuv420p",
                macro_block_size=2,  # the default 16 would rescale the frames
                quality=None,  # we pass -crf ourselves
                output_params=["-crf", str(MP4_CRF), "-movflags", "+faststart"],
            )
        elif suffix == ".gif":
            durations = _frame_durations_ms(num_frames, fps, tick_ms=10, min_ms=GIF_MIN_DELAY_MS)
            _write_gif(partial, x, durations)
        else:
            durations = _frame_durations_ms(num_frames, fps, tick_ms=1, min_ms=1)
            iio.imwrite(
                partial, x, plugin="pillow", extension=".webp", duration=durations, loop=0, quality=WEBP_QUALITY
            )
        os.replace(partial, path)
    except Exception:
        partial.unlink(missing_ok=True)
        raise
    logger.info("wrote %d frames (%dx%d, %.3g fps) to %s", num_frames, x.shape[2], x.shape[1], fps, path)
    return path


def _write_gif(path: Path, frames: np.ndarray, durations: list) -> None:
    """An animated GIF with one palette for every frame and no dithering: a pixel that does not change in the video
    does not change in the GIF (per-frame palettes and error diffusion make still regions shimmer), so a
    cinemagraph's background stays exactly still and a loop does not flicker at the wrap."""
    from PIL import Image

    step = max(1, len(frames) // 16)
    sample = np.concatenate(list(frames[::step]), axis=0)  # up to 16 frames stacked: the palette's source
    palette = Image.fromarray(sample).quantize(colors=256, method=Image.Quantize.MEDIANCUT,
                                                 dither=Image.Dither.NONE)
    images = [Image.fromarray(frame).quantize(palette=palette, dither=Image.Dither.NONE) for frame in frames]
    images[0].save(path, format="GIF", save_all=True, append_images=images[1:], duration=durations, loop=0,
                   optimize=False, disposal=1)


class VideoInputError(ValueError):
    """A video that cannot be used: missing, unreadable, without frames, or too large to decode."""


def _rgb_frame(frame: Any, what: str) -> np.ndarray:
    """A decoded frame as uint8 ``(H, W, 3)``: grey repeated, alpha dropped (loops are opaque)."""
    frame = np.asarray(frame)
    if frame.dtype != np.uint8:
        raise VideoInputError(f"{what} has {frame.dtype} frames; expected 8-bit")
    if frame.ndim == 2:
        frame = frame[..., None]
    if frame.shape[-1] == 1:
        frame = np.repeat(frame, 3, axis=-1)
    return frame[..., :3]


def read_video(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a video or animated image back as uint8 RGB frames of shape ``(F, H, W, 3)``.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file holds no frames or frames that are not 8-bit.
    """
    import imageio.v3 as iio

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such video file: {path}")
    frames = [_rgb_frame(frame, str(path)) for frame in iio.imiter(path)]
    if not frames:
        raise ValueError(f"{path} contains no frames")
    return np.stack(frames)


def _json_default(value: Any) -> Any:
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    return str(value)


def write_sidecar(output_path: str | os.PathLike[str], data: Mapping[str, Any]) -> Path:
    """Write ``data`` as indented JSON to ``<output stem>.json`` beside ``output_path``; return that path.

    Odd values are made JSON-friendly: objects with ``to_dict()`` (e.g. ``LoopMetrics``) use it, numpy values become
    Python numbers/lists, anything else becomes ``str(value)``. A non-finite float is written as ``Infinity``/``NaN``
    (Python's json convention).

    Raises:
        ValueError: ``output_path`` is itself a ``.json`` file (the sidecar would overwrite it).
    """
    output_path = Path(output_path)
    sidecar = output_path.with_suffix(".json")
    if sidecar == output_path:
        raise ValueError(f"output path {output_path} is already a .json file; its sidecar would overwrite it")
    sidecar.parent.mkdir(parents=True, exist_ok=True)
    sidecar.write_text(json.dumps(dict(data), indent=2, default=_json_default) + "\n", encoding="utf-8")
    return sidecar


def seam_strip(frames: Any, n: int = 3, around: tuple[int, int] | None = None) -> np.ndarray:
    """An image of frames side by side around a jump, so the eye can check it.

    By default shows the last ``n`` frames, a thin magenta separator, then the first ``n`` frames (the wrap).
    With ``around=(a, b)`` it shows frames ``a-n+1 .. a``, the separator, then ``b .. b+n-1`` (0-based indices,
    taken cyclically), e.g. ``around=loop_metrics(frames).worst_step``.

    Args:
        frames: uint8 ``(F, H, W, 3)`` or float in [0, 1].
        n: frames on each side, 1 <= n <= F.
        around: the two frames either side of the jump; default ``(F-1, 0)``.

    Returns:
        uint8 array of shape ``(H, 2*n*W + 2, 3)``.

    Raises:
        ValueError: bad frames, ``n`` or ``around``.
    """
    x = to_uint8_frames(frames)
    num_frames, height = x.shape[0], x.shape[1]
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= num_frames:
        raise ValueError(f"n must be an integer from 1 to the number of frames ({num_frames}), got {n!r}")
    try:
        a, b = (num_frames - 1, 0) if around is None else around
    except (TypeError, ValueError) as e:
        raise ValueError(f"around must be a pair of frame indices (a, b), got {around!r}") from e
    for index in (a, b):
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < num_frames:
            raise ValueError(f"around must hold two frame indices in [0, {num_frames}), got {around!r}")
    left = [(a - n + 1 + i) % num_frames for i in range(n)]
    right = [(b + i) % num_frames for i in range(n)]
    separator = np.empty((height, SEPARATOR_WIDTH, 3), dtype=np.uint8)
    separator[:] = SEPARATOR_COLOR
    return np.concatenate([*x[left], separator, *x[right]], axis=1)
