"""A user's clip, read for a loop: only the frames the loop uses, each fitted to the loop's size as it is decoded.

A 19 KB MP4 of black 1080p frames decodes to gigabytes; a loop of 49 frames at 720x480 needs 51 MB of them. So a
clip is streamed (one source frame in memory at a time), the frames the loop takes are fitted at once, and decoding
stops after the last one: memory is the loop's frames plus one source frame, whatever the clip's length. The header
is checked first (frame size, frame rate), and a few decodes at most run at once on a server.
"""

from __future__ import annotations

import logging
import math
import os
import re
import subprocess
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from loopui.media.export import VideoInputError, _rgb_frame
from loopui.media.images import MAX_CLIP_FPS, MIN_CLIP_FRAMES, _check_size, clip_indices, fit_frame

logger = logging.getLogger(__name__)

# 8K UHD: the largest frames a camera or phone writes. One such frame is 100 MB decoded; more is a bomb.
MAX_CLIP_FRAME_PIXELS = 7680 * 4320
# Decodes running at once (each holds a loop's frames and one source frame); more callers wait their turn.
MAX_CONCURRENT_DECODES = 2

_ANIMATED_IMAGE_SUFFIXES = (".gif", ".webp", ".png", ".apng")
_decode_slots = threading.BoundedSemaphore(MAX_CONCURRENT_DECODES)
_active_lock = threading.Lock()
_active = 0
_peak_active = 0


@contextmanager
def decode_slot() -> Iterator[None]:
    """Hold one of the ``MAX_CONCURRENT_DECODES`` decode places while the block runs (waits for a free one)."""
    global _active, _peak_active
    with _decode_slots:
        with _active_lock:
            _active += 1
            _peak_active = max(_peak_active, _active)
        try:
            yield
        finally:
            with _active_lock:
                _active -= 1


def decode_counts(reset: bool = False) -> tuple[int, int]:
    """(decodes running now, the most that ran at once since the last reset)."""
    global _peak_active
    with _active_lock:
        counts = (_active, _peak_active)
        if reset:
            _peak_active = _active
        return counts


def _reason(exc: BaseException) -> str:
    """A decoder's failure in the user's words: the libraries' own ("Could not load meta information", "Could not
    find a backend to open ...") name their internals and the server's paths."""
    text = str(exc)
    if "truncated" in text.lower() and "meta information" not in text:
        return "it is truncated (an incomplete upload?)"
    return "not a video file (or it is truncated)"


def _header_fps(path: Path) -> Optional[float]:
    """The stream's frame rate from ffmpeg's own header line, for the rates imageio-ffmpeg does not parse: ffmpeg
    writes 1000 fps as "1k fps" (imageio then reports 0)."""
    import imageio_ffmpeg

    try:
        done = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", os.fspath(path)],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    for line in done.stderr.splitlines():
        if "Video:" in line:
            for unit in ("fps", "tbr"):
                match = re.search(rf"\s(\d+(?:\.\d+)?)(k?) {unit}\b", line)
                if match:
                    return float(match.group(1)) * (1000.0 if match.group(2) else 1.0)
    return None


def probe_clip(path: str | os.PathLike[str]) -> tuple[Optional[float], Optional[tuple[int, int]], Optional[float]]:
    """``(fps, (width, height), duration in s)`` of a video or animated image from its header, each None when the
    file does not say. Animated GIF/WebP: the mean frame duration (PIL decodes one frame at a time to read it).
    Raises :class:`VideoInputError` when the file is not a video."""
    path = Path(path)
    what = f"video file {str(path)!r}"
    try:
        if path.suffix.lower() in _ANIMATED_IMAGE_SUFFIXES:
            from PIL import Image

            with Image.open(path) as im:
                size = im.size
                count = getattr(im, "n_frames", 1)
                total_ms = 0.0
                for index in range(count):
                    im.seek(index)
                    im.load()  # WebP fills in a frame's duration only once it is decoded
                    total_ms += float(im.info.get("duration") or 0)
            fps = count * 1000.0 / total_ms if total_ms > 0 else None
            return fps, size, (total_ms / 1000.0 if total_ms > 0 else None)
        import imageio.v3 as iio

        meta = iio.immeta(path, plugin="FFMPEG")
    except Exception as exc:  # noqa: BLE001 -- decoders raise anything on a broken file; the user needs one line
        logger.debug("cannot probe %s", path, exc_info=exc)
        raise VideoInputError(f"cannot read {what}: {_reason(exc)}") from exc
    fps = meta.get("fps")
    fps = float(fps) if fps and math.isfinite(fps) and fps > 0 else _header_fps(path)
    size = tuple(int(v) for v in meta["size"]) if meta.get("size") else None
    duration = meta.get("duration")
    duration = float(duration) if duration and math.isfinite(duration) and duration > 0 else None
    return fps, size, duration


def _check_frame_pixels(size: tuple[int, int], what: str, max_frame_pixels: int) -> None:
    width, height = size
    if width * height > max_frame_pixels:
        raise VideoInputError(f"{what} is over {max_frame_pixels / 1e6:.3g} megapixels a frame ({width}x{height}); "
                              f"use a smaller clip")


def _decode(path: Path, wanted: np.ndarray, last: int, out: np.ndarray, what: str,
            max_frame_pixels: int) -> tuple[int, bool, Optional[np.ndarray]]:
    """Stream frames ``0..last`` of ``path``, fitting source frame ``wanted[j]`` into ``out[j]``. Returns (frames
    read, whether more frames follow ``last``, the last frame read, unfitted)."""
    import imageio.v3 as iio

    height, width = out.shape[1:3]
    slots: dict[int, list[int]] = {}
    for slot, index in enumerate(wanted.tolist()):
        slots.setdefault(index, []).append(slot)
    count, more, previous, shape = 0, False, None, None
    frames = iio.imiter(path)
    try:
        for index, frame in enumerate(frames):
            if index > last:
                more = True
                break
            frame = _rgb_frame(frame, what)
            if shape is None:
                shape = frame.shape
                _check_frame_pixels((shape[1], shape[0]), what, max_frame_pixels)
            elif frame.shape != shape:
                raise VideoInputError(f"{what} has frames of different sizes")
            if index in slots:
                fitted = fit_frame(frame, width, height)
                for slot in slots[index]:
                    out[slot] = fitted
            previous, count = frame, index + 1
    except VideoInputError:
        raise
    except Exception as exc:  # noqa: BLE001 -- decoders raise anything on a broken file; the user needs one line
        logger.debug("cannot decode %s", path, exc_info=exc)
        raise VideoInputError(f"cannot read {what}: {_reason(exc)}") from exc
    finally:
        close = getattr(frames, "close", None)
        if close is not None:
            close()  # ends ffmpeg at once instead of letting it decode the rest of the clip
    return count, more, previous


def _checked_file(path: str | os.PathLike[str]) -> tuple[Path, str]:
    """``(path, "video file '...'")`` for a clip that exists, is a file and is not empty; ``VideoInputError``
    naming the file otherwise."""
    path = Path(path)
    what = f"video file {str(path)!r}"
    if not path.exists():
        raise VideoInputError(f"{what} not found")
    if not path.is_file():
        raise VideoInputError(f"{what} is not a file")
    if path.stat().st_size == 0:
        raise VideoInputError(f"cannot read {what}: the file is empty")
    return path, what


def read_clip(path: str | os.PathLike[str], num_frames: int, fps: float, width: int, height: int,
              max_frame_pixels: int = MAX_CLIP_FRAME_PIXELS) -> tuple[np.ndarray, list[str]]:
    """A clip file as the loop uses it: ``num_frames`` frames at ``fps``, each covering ``width`` x ``height``
    (centre crop), taken as :func:`loopui.media.resample_clip` takes them from decoded frames -- without decoding
    the rest.

    Only the frames up to the loop's last one are decoded, one at a time, each kept frame fitted to the loop's size
    at once: the memory used is the loop's frames plus one source frame. A clip shorter than the loop is read twice
    (its length is known only at its end). Raises :class:`VideoInputError` (missing, a folder, empty, not a video,
    truncated, frames over ``max_frame_pixels``) or ``ImageInputError`` (under ``MIN_CLIP_FRAMES`` frames, a frame
    rate over ``MAX_CLIP_FPS``), both ``ValueError`` in one line. Returns ``(frames (num_frames, H, W, 3) uint8,
    notes)``.
    """
    from loopui.media.images import ImageInputError

    _check_size(width, height)
    path, what = _checked_file(path)
    notes: list[str] = []
    with decode_slot():
        # 1. The header: the frame rate decides which frames are used, the frame size whether any is decoded
        source_fps, size, duration = probe_clip(path)
        if size is not None:
            _check_frame_pixels(size, what, max_frame_pixels)
        if source_fps is None:
            source_fps = float(fps)
            notes.append(f"the clip does not record its frame rate: read as {fps:g} fps")
        if not (math.isfinite(source_fps) and 0 < source_fps <= MAX_CLIP_FPS):
            raise ImageInputError(f"video: frame rate {float(source_fps)!r} is not a usable fps (0 to {MAX_CLIP_FPS:g})")
        # 2. The frames the loop takes when the clip lasts as long as the loop, and the count that tells it does
        needed = num_frames / float(fps)
        enough = max(1, math.ceil((needed - 1e-9) * source_fps))
        wanted = np.round(np.arange(num_frames) / float(fps) * source_fps).astype(int)
        last = max(int(wanted.max()), enough - 1, MIN_CLIP_FRAMES - 1)
        out = np.empty((num_frames, height, width, 3), dtype=np.uint8)
        count, more, previous = _decode(path, wanted, last, out, what, max_frame_pixels)
        if count < MIN_CLIP_FRAMES:
            raise ImageInputError(f"video: the clip has {count} frame{'s' if count != 1 else ''}; a loop needs at "
                                  f"least {MIN_CLIP_FRAMES}")
        if count >= enough:
            # Loop times past the clip's last frame take that frame (as resample_clip does).
            late = wanted >= count
            if late.any():
                out[late] = fit_frame(previous, width, height)
            total = duration if duration is not None else (None if more else count / source_fps)
            if total is not None and total > needed + 0.5 / fps:
                notes.append(f"the loop uses the clip's first {needed:.2f} s of {total:.2f} s")
            elif total is None and more:
                notes.append(f"the loop uses the clip's first {needed:.2f} s")
        else:
            # 3. Shorter than the loop: stretched over it; its length is known now, so read the frames it needs
            stretched, stretch_notes = clip_indices(count, source_fps, num_frames, fps)
            notes += stretch_notes
            _decode(path, stretched, int(stretched.max()), out, what, max_frame_pixels)
    logger.debug("read %s: %d frames decoded for a loop of %d", path.name, count, num_frames)
    return out, notes


# 2 GiB of decoded RGB: about 2000 frames of 720x480, far beyond a loop, and well within a machine's memory.
DEFAULT_MAX_VIDEO_BYTES = 2 * 2**30


def load_video(path: str | os.PathLike[str],
               max_bytes: int = DEFAULT_MAX_VIDEO_BYTES) -> tuple[np.ndarray, Optional[float]]:
    """Read any video or animated image (MP4, WebM, MOV, GIF, WebP, ...) as uint8 RGB ``(F, H, W, 3)`` and its fps.

    Unlike :func:`read_video` (our own exports), every failure is one :class:`VideoInputError` line naming the
    file: missing, a folder, not a video, no frames, or more than ``max_bytes`` once decoded (checked while
    decoding, so a huge file stops early). The fps is None when the file does not record one.
    """
    import imageio.v3 as iio

    path, what = _checked_file(path)
    frames: list[np.ndarray] = []
    size = 0
    with decode_slot():
        fps = probe_clip(path)[0]
        try:
            for frame in iio.imiter(path):
                frame = _rgb_frame(frame, what)
                size += frame.nbytes
                if size > max_bytes:
                    raise VideoInputError(f"{what} is over {max_bytes / 2**30:.1f} GiB once decoded; use a shorter "
                                          f"or smaller clip")
                frames.append(frame)
        except VideoInputError:
            raise
        except Exception as exc:  # noqa: BLE001 -- decoders raise anything on a broken file; the user needs one line
            logger.debug("cannot decode %s", path, exc_info=exc)
            raise VideoInputError(f"cannot read {what}: {_reason(exc)}") from exc
    if not frames:
        raise VideoInputError(f"{what} contains no frames")
    if any(f.shape != frames[0].shape for f in frames):
        raise VideoInputError(f"{what} has frames of different sizes")
    return np.stack(frames), fps
