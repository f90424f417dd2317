"""Reference images and user masks: load anything reasonable, get exactly the size the model needs.

Both loaders honour EXIF orientation (phone photos come out upright) and fit to the target size the same way:
scale to *cover* the target keeping the aspect ratio, then crop the overflow centrally. A mask painted on the
reference image therefore stays aligned with it.
"""

from __future__ import annotations

import logging
import os
import warnings

from typing import Optional

import numpy as np
from PIL import Image, ImageOps

logger = logging.getLogger(__name__)

# 64 megapixels is far above any frame size a video model uses, and far below what exhausts memory when decoded.
DEFAULT_MAX_PIXELS = 64_000_000

# Modes whose 16/32-bit values PIL's convert("RGB") would clip at 255 instead of scaling.
_WIDE_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")

ImageSource = str | os.PathLike[str] | Image.Image | np.ndarray


class ImageInputError(ValueError):
    """An input image or mask that cannot be used: unreadable, not an image, too large, or of an unsupported layout."""


def _check_size(width: int, height: int) -> None:
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_pixels(size: tuple[int, int], max_pixels: int, what: str) -> None:
    width, height = size
    if width * height > max_pixels:
        raise ImageInputError(
            f"{what} is {width}x{height} = {width * height / 1e6:.1f} megapixels, over the limit of "
            f"{max_pixels / 1e6:.1f} megapixels (possible decompression bomb); use a smaller image"
        )


def _read_path(path: str | os.PathLike[str], max_pixels: int) -> Image.Image:
    """Open, size-check (from the header, before decoding), decode and upright an image file."""
    what = f"image file {os.fspath(path)!r}"
    if not os.path.exists(path):
        raise ImageInputError(f"{what} not found")
    # PIL warns about (and past twice its limit refuses) huge images at open time; turn the warning into an error so
    # both end up as our message. catch_warnings is process-global and not thread-safe: a race can only change which
    # warnings get shown elsewhere, never bypass our own pixel cap below.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as im:
                _check_pixels(im.size, max_pixels, what)
                im.load()
                return ImageOps.exif_transpose(im)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageInputError(f"{what} is too large to decode safely (possible decompression bomb): {e}") from e
        except OSError as e:  # missing, a directory, not an image (UnidentifiedImageError), truncated
            raise ImageInputError(f"cannot read {what}: {e}") from e


def _to_image(src: ImageSource, max_pixels: int) -> Image.Image | np.ndarray:
    """A decoded, upright PIL image for paths and PIL input; arrays are passed through (size-checked)."""
    if isinstance(src, (str, os.PathLike)):
        return _read_path(src, max_pixels)
    if isinstance(src, Image.Image):
        _check_pixels(src.size, max_pixels, "image")
        try:
            return ImageOps.exif_transpose(src)
        except OSError as e:  # a lazily opened image that fails to decode
            raise ImageInputError(f"cannot decode image: {e}") from e
    if isinstance(src, np.ndarray):
        if src.ndim >= 2:
            _check_pixels((src.shape[1], src.shape[0]), max_pixels, "image array")
        return src
    raise ImageInputError(f"unsupported image source of type {type(src).__name__}; pass a path, PIL image or array")


def _unit_float(a: np.ndarray) -> np.ndarray:
    """Array values as float32 in [0, 1]: uint8 / 255, uint16 / 65535, bool as 0/1, float checked and clipped."""
    if a.dtype == np.bool_:
        return a.astype(np.float32)
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    if a.dtype == np.uint16:
        return a.astype(np.float32) / 65535.0
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise ImageInputError("image array contains NaN or infinite values")
        lo, hi = float(a.min()), float(a.max())
        if lo < -0.01 or hi > 1.01:
            raise ImageInputError(f"float values must be in [0, 1], got values from {lo:.3g} to {hi:.3g}")
        return np.clip(a, 0.0, 1.0).astype(np.float32)
    raise ImageInputError(f"unsupported image array dtype {a.dtype}; use uint8, uint16, bool or float in [0, 1]")


def _check_layout(a: np.ndarray) -> np.ndarray:
    """Accept (H, W), (H, W, 1), (H, W, 3) and (H, W, 4); return (H, W) or (H, W, 3|4)."""
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (3, 4))) or 0 in a.shape:
        raise ImageInputError(f"image arrays must have shape (H, W), (H, W, 3) or (H, W, 4), got {a.shape}")
    return a


def _wide_mode_to_unit(im: Image.Image) -> np.ndarray:
    # 16-bit grayscale files open as I;16 (or I); treat them as 0..65535. Mode F is taken to be in [0, 1].
    a = np.asarray(im)
    if im.mode == "F":
        return np.clip(np.nan_to_num(a.astype(np.float32)), 0.0, 1.0)
    return np.clip(a.astype(np.float32) / 65535.0, 0.0, 1.0)


def _has_alpha(im: Image.Image) -> bool:
    return im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info


def _flatten_on_white(im: Image.Image) -> Image.Image:
    background = Image.new("RGBA", im.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, im.convert("RGBA")).convert("RGB")


def _pil_to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in _WIDE_MODES:
        gray = np.round(_wide_mode_to_unit(im) * 255.0).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if _has_alpha(im):
        return _flatten_on_white(im)
    try:
        return im.convert("RGB")  # CMYK, YCbCr, palette, L, 1, ...
    except ValueError as e:
        raise ImageInputError(f"cannot convert image mode {im.mode!r} to RGB: {e}") from e


def _array_to_pil(a: np.ndarray) -> Image.Image:
    a = _check_layout(a)
    u8 = np.round(_unit_float(a) * 255.0).astype(np.uint8)
    return Image.fromarray(u8)  # L, RGB or RGBA by channel count


def open_image(src: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """An image as an upright RGB PIL image at its own size (EXIF rotation applied, transparency flattened onto
    white, CMYK/palette/16-bit converted); the one image reader of the project. Raises :class:`ImageInputError`."""
    image = _to_image(src, max_pixels)
    return _pil_to_rgb(_array_to_pil(image) if isinstance(image, np.ndarray) else image)


def read_mask(src: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A mask as float32 ``(H, W)`` in [0, 1] at its own size (white, painted or opaque = 1); the one mask reader
    of the project (see :func:`load_mask_image` for the rules). Raises :class:`ImageInputError`."""
    image = _to_image(src, max_pixels)
    unit = _unit_float(_check_layout(image)) if isinstance(image, np.ndarray) else _pil_to_mask_unit(image)
    return np.ascontiguousarray(_mask_from_unit(unit), dtype=np.float32)


def load_reference_image(
    src: ImageSource, width: int, height: int, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """Load a reference image as RGB of exactly ``width`` x ``height``.

    The image is turned upright by its EXIF orientation, converted to RGB (CMYK, palette, grayscale, 16-bit;
    transparency is flattened onto white), then scaled to cover the target keeping its aspect ratio and cropped
    centrally (the overflow on the longer side is cut off equally on both ends).

    Args:
        src: a file path, a PIL image, or a numpy array (H, W), (H, W, 3) or (H, W, 4) of uint8, uint16 or float
            in [0, 1].
        width: output width in pixels.
        height: output height in pixels.
        max_pixels: refuse inputs with more pixels than this (checked from the file header before decoding).

    Raises:
        ImageInputError: unreadable file, not an image, too many pixels, or an unsupported array layout/dtype.
        ValueError: width or height not a positive integer.
    """
    _check_size(width, height)
    rgb = open_image(src, max_pixels)
    if rgb.size != (width, height):
        logger.debug("fitting reference image %dx%d to %dx%d", rgb.width, rgb.height, width, height)
    return ImageOps.fit(rgb, (width, height), method=Image.Resampling.LANCZOS, centering=(0.5, 0.5))


def _pil_to_mask_unit(im: Image.Image) -> np.ndarray:
    if im.mode in _WIDE_MODES:
        return _wide_mode_to_unit(im)
    if _has_alpha(im):
        return _unit_float(np.asarray(im.convert("RGBA")))
    if im.mode not in ("L", "RGB"):
        im = im.convert("L") if im.mode in ("1", "P") else im.convert("RGB")
    return _unit_float(np.asarray(im))


def _mask_from_unit(a: np.ndarray) -> np.ndarray:
    """(H, W) from (H, W) / (H, W, 3) / (H, W, 4) in [0, 1]: the alpha channel if it carries anything, else the
    brightest colour channel (so a pure red, green or blue stroke on black counts as fully painted)."""
    if a.ndim == 2:
        return a
    if a.shape[-1] == 4 and not (a[..., 3] == 1.0).all():
        return a[..., 3]
    return a[..., :3].max(axis=-1)


def load_mask_image(
    src: ImageSource, width: int, height: int, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Load a user mask as float32 ``(height, width)`` in [0, 1], white (or opaque) = 1.

    Grayscale is used as is, RGB as its brightest channel; for RGBA (e.g. a layer painted in ``gr.ImageEditor``)
    the alpha channel is used when it is not fully opaque, else the brightest channel of RGB. uint8 values are
    divided by 255, uint16 by 65535, bools become 0/1. The mask is fitted with the same cover-and-centre-crop
    geometry as :func:`load_reference_image` (bilinear, which keeps feathered edges soft), so a mask made on the
    reference image stays aligned with it.

    Raises:
        ImageInputError: unreadable file, not an image, too many pixels, or an unsupported array layout/dtype.
        ValueError: width or height not a positive integer.
    """
    _check_size(width, height)
    mask = Image.fromarray(read_mask(src, max_pixels))  # mode F
    fitted = ImageOps.fit(mask, (width, height), method=Image.Resampling.BILINEAR, centering=(0.5, 0.5))
    return np.clip(np.asarray(fitted, dtype=np.float32), 0.0, 1.0)


MAX_CLIP_FPS = 240.0
MIN_CLIP_FRAMES = 4


def fit_frame(frame: np.ndarray, width: int, height: int) -> np.ndarray:
    """One uint8 ``(H, W, 3)`` frame scaled to cover ``width`` x ``height`` and centre-cropped (as reference images
    are)."""
    return np.asarray(ImageOps.fit(Image.fromarray(frame), (width, height), method=Image.Resampling.LANCZOS,
                                   centering=(0.5, 0.5)))


def clip_indices(count: int, source_fps: float, num_frames: int, fps: float) -> tuple[np.ndarray, list[str]]:
    """Which of a clip's ``count`` frames (at ``source_fps``) fill a loop of ``num_frames`` at ``fps``, and notes.

    The loop's own frame times from the clip's start, nearest source frame, so motion keeps its speed; a clip
    shorter than the loop is stretched over it (slower motion), and a note says so.
    """
    duration = count / float(source_fps)
    needed = num_frames / float(fps)
    notes = []
    if duration + 1e-9 < needed:
        times = np.linspace(0.0, duration, num_frames, endpoint=False)
        notes.append(f"the clip lasts {duration:.2f} s, shorter than the loop's {needed:.2f} s: stretched over it "
                     f"(slower motion); give a longer clip or fewer frames to keep its speed")
    else:
        times = np.arange(num_frames) / float(fps)
        if duration > needed + 0.5 / fps:
            notes.append(f"the loop uses the clip's first {needed:.2f} s of {duration:.2f} s")
    return np.clip(np.round(times * source_fps).astype(int), 0, count - 1), notes


def resample_clip(frames: np.ndarray, source_fps: Optional[float], num_frames: int, fps: float, width: int,
                  height: int) -> tuple[np.ndarray, list[str]]:
    """A user's clip as ``num_frames`` frames at ``fps``, each covering ``width`` x ``height`` (centre crop).

    Frames are taken at the loop's own frame times from the clip's start (nearest source frame), so motion keeps its
    speed. A clip shorter than the loop is stretched over it (slower motion) and a note says so. Raises
    ``ImageInputError`` for a clip of fewer than ``MIN_CLIP_FRAMES`` frames or an fps that is not a positive number
    up to ``MAX_CLIP_FPS``. Returns ``(frames (num_frames, H, W, 3) uint8, notes)``. For a clip file,
    :func:`loopui.media.read_clip` takes the same frames without decoding the others.
    """
    _check_size(width, height)
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ImageInputError(f"video: expected uint8 frames (F, H, W, 3), got {frames.dtype} {frames.shape}")
    count = int(frames.shape[0])
    if count < MIN_CLIP_FRAMES:
        raise ImageInputError(f"video: the clip has {count} frame{'s' if count != 1 else ''}; a loop needs at least "
                              f"{MIN_CLIP_FRAMES}")
    notes = []
    if source_fps is None:
        source_fps = float(fps)
        notes.append(f"the clip does not record its frame rate: read as {fps:g} fps")
    if not (np.isfinite(source_fps) and 0 < source_fps <= MAX_CLIP_FPS):
        raise ImageInputError(f"video: frame rate {source_fps!r} is not a usable fps (0 to {MAX_CLIP_FPS:g})")
    index, index_notes = clip_indices(count, source_fps, num_frames, fps)
    out = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    for slot, i in enumerate(index):
        out[slot] = fit_frame(frames[i], width, height)
    return out, notes + index_notes
