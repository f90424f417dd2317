"""Pick the motion mask for a reference image: the user's own mask when given, else the saliency model's."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np

from .masks import (DEFAULT_FEATHER, DEFAULT_GROW, DEFAULT_THRESHOLD, ImageLike, check_postprocess_args,
                    load_user_mask, mask_coverage, postprocess_mask, to_rgb_array)
from .models import DEFAULT_MASK_MODEL, compute_saliency, mask_model_info

logger = logging.getLogger(__name__)


@dataclass
class MaskResult:
    """The motion mask of one reference image and where it came from.

    ``mask``: float32 ``(H, W)`` in [0, 1] at the image size, post-processed (1 = may move).
    ``raw``: the same before post-processing (the user's mask resized, or the model's soft mask), so a UI can
    re-run ``postprocess_mask`` on slider moves without running the model again.
    ``source``: ``"user"`` or ``"model"``; ``model_name``: the saliency model used (``None`` for a user mask).
    ``message``: one line for the page or the log.
    """

    mask: np.ndarray
    source: str
    model_name: Optional[str]
    message: str
    raw: Optional[np.ndarray] = None

    @property
    def coverage(self) -> float:
        """Fraction of the frame that may move."""
        return mask_coverage(self.mask)


def resolve_mask(image: ImageLike, user_mask: Any = None, model_name: str = DEFAULT_MASK_MODEL,
                 threshold: float = DEFAULT_THRESHOLD, grow: int = DEFAULT_GROW, feather: float = DEFAULT_FEATHER,
                 invert: bool = False, model_path: Optional[Union[str, "os.PathLike[str]"]] = None) -> MaskResult:
    """The motion mask of ``image``: ``user_mask`` wins; otherwise the saliency model computes one.

    ``user_mask``: path, PIL image or array (``HxW`` / ``HxWx3/4``; uint8, bool or float in [0, 1]), white or
    painted = may move, resized to the image. An all-zero user mask counts as "no mask given" (an untouched
    paint canvas), so the model runs instead. ``threshold``/``grow``/``feather``/``invert`` go through
    ``postprocess_mask`` for both sources; a painted 0/1 mask is unchanged by any threshold in (0, 1].
    ``model_path`` runs a custom ONNX file through rembg's ``u2net_custom`` session instead of ``model_name``.
    Raises ``SaliencyUnavailable`` when the model is needed but its weights are missing, ``ValueError`` for bad
    input (the model name is checked even when a user mask makes it unnecessary, so typos surface early).
    """
    # Check every knob before the (possibly slow) model runs.
    if model_path is None:
        mask_model_info(model_name)
    check_postprocess_args(threshold, grow, feather)
    rgb = to_rgb_array(image)
    height, width = rgb.shape[:2]
    user = load_user_mask(user_mask, size=(width, height))
    if user is not None:
        mask = postprocess_mask(user, threshold, grow, feather, invert)
        message = f"using your mask: {100.0 * mask_coverage(mask):.1f}% of the frame may move"
        return MaskResult(mask=mask, source="user", model_name=None, message=message, raw=user)

    label = model_name if model_path is None else f"custom model {os.fspath(model_path)}"
    raw = compute_saliency(rgb, model_name, model_path=model_path)
    mask = postprocess_mask(raw, threshold, grow, feather, invert)
    region = "background" if invert else "object"
    message = f"{region} mask from {label}: {100.0 * mask_coverage(mask):.1f}% of the frame may move"
    logger.info(message)
    return MaskResult(mask=mask, source="model", model_name=model_name if model_path is None else "u2net_custom",
                      message=message, raw=raw)
