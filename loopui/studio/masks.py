"""Mask previews for the page's editor and the masks painted on them: the motion mask the engine would use for a
reference image, at preview size, and the user's strokes written over it."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

MASK_PREVIEW_MAX_SIDE = 512  # the preview mask is computed on a downscaled copy: fast, and the engine resizes it
SALIENCY_CACHE_SIZE = 16

# The preview tints what may move in green (it stays visible on red and orange objects); the two brushes are the
# same green ("may move") and a dark grey ("hold still"), and the green channel tells painted strokes apart.
OVERLAY_COLOR = (40, 220, 120)
PAINT_MOVE_COLOR = "rgb(40, 220, 120)"
PAINT_STILL_COLOR = "rgb(40, 40, 40)"

logger = logging.getLogger(__name__)

# What a visitor is told when the saliency model cannot run (its path and download URL stay in the server log).
NO_MASK_MODEL = "{model} is not available on this server (its weights could not be loaded)"


@dataclass
class MaskPreview:
    """A reference image prepared for the mask editor: preview-sized image, motion mask, overlay and a note."""

    image: Optional[np.ndarray]  # (h, w, 3) uint8, downscaled
    mask: Optional[np.ndarray]  # (h, w) float32 motion mask (1 = may move), None when there is none
    overlay: Optional[np.ndarray]  # (h, w, 3) uint8 image tinted where it may move
    note: str


class MaskPreviews:
    """Mask previews and painted masks for every session, with the saliency model's raw masks cached per image so
    that a slider move only re-runs the post-processing."""

    def __init__(self) -> None:
        self._cache: "OrderedDict[tuple, Any]" = OrderedDict()
        self._lock = threading.Lock()

    def _raw_saliency(self, image: np.ndarray, image_path: str, mask_model: str) -> Any:
        """The model's soft object mask for a preview image (cached: slider moves only re-run post-processing)."""
        path = Path(image_path)
        key = (str(path), path.stat().st_mtime_ns if path.exists() else 0, mask_model)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        from loopui.saliency import compute_saliency

        raw = compute_saliency(image, mask_model)
        with self._lock:
            self._cache[key] = raw
            while len(self._cache) > SALIENCY_CACHE_SIZE:
                self._cache.popitem(last=False)
        return raw

    def preview(self, image_path: Optional[str], mask_model: str, threshold: float, grow: int, feather: int,
                motion_region: str) -> MaskPreview:
        """The motion mask the engine would use for this image and these settings, at preview size.

        Missing saliency weights are not an error here: the note says why and the user can still paint.
        """
        if not image_path:
            return MaskPreview(None, None, None, "")
        from loopui import saliency

        image = preview_image(image_path)
        if motion_region == "everything":
            return MaskPreview(image, None, image, "Motion region *everything*: the whole frame may move; no mask "
                                                   "is used (painting has no effect).")
        start = time.perf_counter()
        try:
            raw = self._raw_saliency(image, image_path, mask_model)
        except saliency.SaliencyUnavailable as exc:
            logger.warning("no automatic mask: %s", exc)  # the operator's details (path, URL) stay in the log
            return MaskPreview(image, None, image, f"No automatic mask: {NO_MASK_MODEL.format(model=mask_model)}. "
                                                   "You can still paint the region that may move (green brush) on "
                                                   "the image.")
        mask = saliency.postprocess_mask(raw, float(threshold), int(grow), float(feather),
                                         invert=motion_region == "background")
        overlay = saliency.overlay_mask(image, mask, color=OVERLAY_COLOR)
        region = "background" if motion_region == "background" else "object"
        note = (f"Green = may move ({region} from {mask_model}, {100 * saliency.mask_coverage(mask):.0f}% of the "
                f"frame, {time.perf_counter() - start:.2f} s). Paint green to add motion, grey to hold still.")
        return MaskPreview(image, mask, overlay, note)

    def painted_mask(self, image_path: Optional[str], layers: Optional[list], mask_model: str,
                     motion_region: str) -> Optional[np.ndarray]:
        """The mask to send with a request when the user painted, else None (the engine computes the same mask).

        Paint means "may move" (green) or "hold still" (grey) in the preview's terms. The engine post-processes a
        user mask exactly like the model's (threshold, invert for the background, grow, feather), so the
        strokes are written into the model's raw *object* mask: a green stroke is object when the object moves
        and background when the background moves.
        """
        if not image_path or motion_region == "everything":
            return None
        move, painted = paint_from_layers(layers)
        if painted is None or not painted.any():
            return None
        image = preview_image(image_path)
        height, width = image.shape[:2]
        move = _resize_bool(move, width, height)
        painted = _resize_bool(painted, width, height)
        from loopui import saliency

        try:
            base = np.asarray(self._raw_saliency(image, image_path, mask_model), dtype=np.float32)
        except saliency.SaliencyUnavailable:
            base = np.zeros((height, width), dtype=np.float32)
        is_object = move if motion_region != "background" else ~move
        out = base.copy()
        out[painted] = is_object[painted].astype(np.float32)
        return np.round(out * 255).astype(np.uint8)


def preview_image(image_path: str, max_side: int = MASK_PREVIEW_MAX_SIDE) -> np.ndarray:
    """The reference image upright, RGB, downscaled to ``max_side`` (``ValueError`` if unreadable)."""
    from PIL import Image

    from loopui.saliency import load_rgb_image

    image = load_rgb_image(image_path)
    image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return np.asarray(image)


def paint_from_layers(layers: Optional[list]) -> tuple[Optional[np.ndarray], Optional[np.ndarray]]:
    """(may-move HxW bool, painted HxW bool) from ImageEditor layers (HxWx4 RGBA), or (None, None)."""
    if not layers:
        return None, None
    move = painted = None
    for layer in layers:
        if layer is None:
            continue
        arr = np.asarray(layer)
        if arr.ndim != 3 or arr.shape[2] != 4:
            continue
        here = arr[..., 3] > 0
        # The green channel tells the two brushes apart (move = bright green, still = dark grey).
        green = arr[..., 1] > 127
        if move is None:
            move, painted = np.zeros(here.shape, bool), np.zeros(here.shape, bool)
        if here.shape != painted.shape:
            continue
        move = np.where(here, green, move)
        painted |= here
    return move, painted


def _resize_bool(mask: np.ndarray, width: int, height: int) -> np.ndarray:
    if mask.shape == (height, width):
        return mask
    from PIL import Image

    img = Image.fromarray(mask.astype(np.uint8) * 255).resize((width, height), Image.Resampling.NEAREST)
    return np.asarray(img) > 127
