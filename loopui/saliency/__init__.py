"""Saliency masks for image-anchored loops: which pixels may move (1) and which stay still (0).

Importing this package is cheap: rembg (and with it onnxruntime) and scipy load on first use. Images and user
masks are read by ``loopui.media`` (the project's one image/mask reader), so a mask lines up with the pixels the
engine animates; like media, this room never imports the engine or gradio.
"""

from .masks import (
    DEFAULT_FEATHER,
    DEFAULT_GROW,
    DEFAULT_THRESHOLD,
    load_rgb_image,
    load_user_mask,
    mask_coverage,
    overlay_mask,
    postprocess_mask,
    resize_mask,
    to_rgb_array,
)
from .models import (
    DEFAULT_MASK_MODEL,
    MASK_MODEL_INFO,
    MASK_MODELS,
    MaskModelInfo,
    SaliencyUnavailable,
    clear_session_cache,
    compute_saliency,
    mask_model_info,
    rembg_home,
    weights_available,
    weights_path,
)
from .resolve import MaskResult, resolve_mask

__all__ = [
    "DEFAULT_FEATHER",
    "DEFAULT_GROW",
    "DEFAULT_MASK_MODEL",
    "DEFAULT_THRESHOLD",
    "MASK_MODELS",
    "MASK_MODEL_INFO",
    "MaskModelInfo",
    "MaskResult",
    "SaliencyUnavailable",
    "clear_session_cache",
    "compute_saliency",
    "load_rgb_image",
    "load_user_mask",
    "mask_coverage",
    "mask_model_info",
    "overlay_mask",
    "postprocess_mask",
    "rembg_home",
    "resize_mask",
    "resolve_mask",
    "to_rgb_array",
    "weights_available",
    "weights_path",
]
