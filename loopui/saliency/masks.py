"""Pure numpy/PIL mask helpers: reading images and user masks, post-processing, and the preview overlay.

Nothing here touches rembg or a model, so the UI can re-run post-processing on every slider move for free.
Masks are float32 ``(H, W)`` arrays in ``[0, 1]`` where 1 means "may move".
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

# The single source of the post-processing defaults; they must equal LoopRequest's knob defaults
# (mask_threshold, mask_grow, mask_feather), which tests/test_saliency.py checks.
DEFAULT_THRESHOLD = 0.5
DEFAULT_GROW = 0
DEFAULT_FEATHER = 8

ImageLike = Union[Image.Image, np.ndarray, str, "os.PathLike[str]"]


def load_rgb_image(path: Union[str, "os.PathLike[str]"]) -> Image.Image:
    """Open an image file upright (EXIF orientation applied) as RGB; ``ValueError`` if it cannot be read.

    The project's one image reader (``loopui.media.open_image``): the same size cap and conversions as the engine's.
    """
    from loopui.media import open_image

    return open_image(path)


def to_rgb_array(image: ImageLike) -> np.ndarray:
    """An image (PIL, path, or ``(H, W)``/``(H, W, 3|4)`` array, uint8 or float in [0, 1]) as ``(H, W, 3)`` uint8.

    Read with ``loopui.media.open_image``, exactly as the engine reads its reference image (EXIF rotation for files
    and PIL images, transparency flattened onto white), so the mask matches the pixels that are animated.
    """
    if not isinstance(image, (str, os.PathLike, Image.Image, np.ndarray)):
        raise ValueError(f"image must be a PIL image, an HxWx3 array or a path, got {type(image).__name__}")
    from loopui.media import open_image

    return np.asarray(open_image(image))


def _to_unit_float(arr: np.ndarray, what: str) -> np.ndarray:
    """bool / integer 0..255 / float 0..1 array -> float32 in [0, 1]; ``ValueError`` naming the bad range."""
    if arr.dtype == np.bool_:
        return arr.astype(np.float32)
    if np.issubdtype(arr.dtype, np.integer):
        lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
        if lo < 0 or hi > 255:
            raise ValueError(f"{what} integer values must be in 0..255, got range {lo}..{hi}")
        return arr.astype(np.float32) / 255.0
    if np.issubdtype(arr.dtype, np.floating):
        if arr.size and not np.all(np.isfinite(arr)):
            raise ValueError(f"{what} contains NaN or infinite values")
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        if lo < -1e-6 or hi > 1.0 + 1e-6:
            raise ValueError(f"{what} float values must be in [0, 1], got range {lo:g}..{hi:g} "
                             "(divide 0..255 data by 255)")
        return np.clip(arr, 0.0, 1.0).astype(np.float32)
    raise ValueError(f"{what} has unsupported dtype {arr.dtype}")


def load_user_mask(user_mask: Any, size: Optional[Tuple[int, int]] = None) -> Optional[np.ndarray]:
    """A user-provided or painted mask as float32 ``(H, W)`` in [0, 1] (``None`` only when none is given).

    ``user_mask`` may be a path, a PIL image or an array (``HxW`` or ``HxWx3/4``; uint8 0..255, bool, or float
    in [0, 1]). White (or any bright / painted pixel) means "may move": 3-channel masks use their brightest
    channel; 4-channel masks use alpha when any pixel is transparent (a painted layer), else the colour — the
    rules of ``loopui.media.read_mask``, the project's one mask reader.
    ``size`` is the target ``(width, height)`` (PIL order); the mask is resized bilinearly to it.
    An all-zero mask is a mask like any other -- "nothing moves" is a valid request (with background freeze it
    makes a still); a caller with an untouched paint canvas should pass ``None`` instead.
    """
    if user_mask is None:
        return None
    if not isinstance(user_mask, (str, os.PathLike, Image.Image, np.ndarray)):
        raise ValueError(f"mask must be a path, a PIL image or an array, got {type(user_mask).__name__}")
    from loopui.media import read_mask

    mask = read_mask(user_mask)
    if size is not None:
        mask = resize_mask(mask, size)
    return mask


def resize_mask(mask: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """Resize a float ``(H, W)`` mask to ``size`` = ``(width, height)`` bilinearly, keeping values in [0, 1]."""
    width, height = int(size[0]), int(size[1])
    if mask.shape == (height, width):
        return mask.astype(np.float32, copy=False)
    resized = Image.fromarray(mask.astype(np.float32), mode="F").resize((width, height), Image.Resampling.BILINEAR)
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)


def _check_number(name: str, value: Any, lo: float, hi: float, integer: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(float(value)) or not lo <= value <= hi:
        raise ValueError(f"{name} must be in [{lo:g}, {hi:g}], got {value!r}")
    if integer and float(value) != int(value):
        raise ValueError(f"{name} must be a whole number of pixels, got {value!r}")
    return value


def check_postprocess_args(threshold: float, grow: int, feather: float) -> None:
    """``ValueError`` naming the offending value unless threshold is in [0, 1], grow whole and feather >= 0."""
    _check_number("threshold", threshold, 0.0, 1.0)
    _check_number("grow", grow, -4096, 4096, integer=True)
    _check_number("feather", feather, 0.0, 4096)


def postprocess_mask(mask: np.ndarray, threshold: float = DEFAULT_THRESHOLD, grow: int = DEFAULT_GROW,
                     feather: float = DEFAULT_FEATHER, invert: bool = False) -> np.ndarray:
    """Turn a soft mask into the motion mask: threshold -> invert -> grow/shrink -> feather.

    * ``threshold``: a pixel is in when its value is ``>= threshold`` (so 0 keeps everything). A painted 0/1
      mask is unchanged by any threshold in (0, 1].
    * ``invert``: swap in and out ("animate the background instead"); done before grow/feather so that those
      act on the region that will move, as the preview shows it. With ``grow == 0`` the result is exactly
      ``1 - postprocess_mask(mask, threshold, 0, feather)``.
    * ``grow``: > 0 dilates, < 0 erodes by ``|grow|`` pixels with a Euclidean disk kernel (computed with a
      distance transform, so large radii cost the same as small ones). Pixels outside the frame count as
      neither in nor out: a region touching the border is not eroded from the border.
    * ``feather``: width in pixels of a smoothstep ramp centred on the hard edge, from the signed distance to
      it. Pixels more than ``feather / 2`` inside stay exactly 1 and more than ``feather / 2`` outside stay 0;
      0 leaves the mask binary.

    ``mask``: ``(H, W)`` float in [0, 1], uint8 0..255 or bool. Returns float32 ``(H, W)`` in [0, 1].
    """
    if not isinstance(mask, np.ndarray) or mask.ndim != 2 or mask.size == 0:
        shape = getattr(mask, "shape", type(mask).__name__)
        raise ValueError(f"mask must be a non-empty HxW array, got {shape}")
    check_postprocess_args(threshold, grow, feather)
    soft = _to_unit_float(mask, "mask")

    # 1. Threshold to a hard region.
    binary = soft >= threshold
    # 2. Invert first, so grow/feather apply to what moves.
    if invert:
        binary = ~binary
    # 3. Grow or shrink.
    grow = int(grow)
    if grow != 0 and binary.any() and not binary.all():
        if grow > 0:
            binary = _distance_to(binary) <= grow
        else:
            binary = _distance_to(~binary) > -grow
    # 4. Feather.
    if feather <= 0 or not binary.any() or binary.all():
        return binary.astype(np.float32)
    # Signed distance to the edge, which lies half a pixel between the last in- and the first out-pixel.
    signed = np.where(binary, _distance_to(~binary), -_distance_to(binary)) - np.where(binary, 0.5, -0.5)
    t = np.clip(0.5 + signed / float(feather), 0.0, 1.0)
    # smoothstep: continuous slope at both ends (no visible band), and s(1 - t) = 1 - s(t) keeps invert exact.
    return (t * t * (3.0 - 2.0 * t)).astype(np.float32)


def _distance_to(region: np.ndarray) -> np.ndarray:
    """Euclidean distance of every pixel to the nearest pixel of ``region`` (0 on the region itself)."""
    from scipy import ndimage  # lazy: keeps `import loopui.saliency` cheap

    return ndimage.distance_transform_edt(~region)


def overlay_mask(image: ImageLike, mask: np.ndarray, color: Sequence[int] = (255, 64, 64),
                 alpha: float = 0.5) -> np.ndarray:
    """The mask preview: ``image`` tinted with ``color`` where ``mask`` is 1, unchanged where it is 0.

    ``mask`` (``(H, W)``, any size; float in [0, 1], uint8 or bool) is resized to the image. Soft values tint
    proportionally. Returns ``(H, W, 3)`` uint8.
    """
    rgb = to_rgb_array(image)
    _check_number("alpha", alpha, 0.0, 1.0)
    if len(color) != 3 or not all(isinstance(c, (int, np.integer)) and 0 <= c <= 255 for c in color):
        raise ValueError(f"color must be three integers in 0..255, got {tuple(color)!r}")
    if not isinstance(mask, np.ndarray) or mask.ndim != 2 or mask.size == 0:
        raise ValueError(f"mask must be a non-empty HxW array, got {getattr(mask, 'shape', type(mask).__name__)}")
    m = resize_mask(_to_unit_float(mask, "mask"), (rgb.shape[1], rgb.shape[0]))
    weight = (float(alpha) * m)[..., None]
    tint = np.asarray(color, dtype=np.float32)[None, None, :]
    out = rgb.astype(np.float32) * (1.0 - weight) + tint * weight
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def mask_coverage(mask: np.ndarray) -> float:
    """Fraction of the frame that may move (mean of the soft mask), in [0, 1]."""
    return float(np.mean(mask)) if mask.size else 0.0
