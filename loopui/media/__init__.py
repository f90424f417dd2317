"""Media room: seam metrics, the papers' loop scores, video export/read-back, sidecars, seam strips, reference
images and masks.

A leaf package: it imports only numpy, PIL, imageio, scipy, scikit-image and the standard library (imageio, scipy
and scikit-image lazily), never torch, the engine, the models or gradio.
"""

from loopui.media.export import (
    SUPPORTED_SUFFIXES,
    VideoInputError,
    export_video,
    read_video,
    seam_strip,
    write_sidecar,
)
from loopui.media.images import (ImageInputError, load_mask_image, load_reference_image, open_image, read_mask,
                                 resample_clip)
from loopui.media.clips import load_video, read_clip
from loopui.media.metrics import LoopMetrics, loop_metrics, seam_ratio
from loopui.media.scores import SCORE_KEYS, SCORES, format_scores, loop_scores, loop_warnings, pixel_loop_metrics

__all__ = [
    "SCORES",
    "SCORE_KEYS",
    "SUPPORTED_SUFFIXES",
    "VideoInputError",
    "ImageInputError",
    "LoopMetrics",
    "export_video",
    "format_scores",
    "load_mask_image",
    "load_reference_image",
    "load_video",
    "loop_metrics",
    "loop_scores",
    "loop_warnings",
    "open_image",
    "pixel_loop_metrics",
    "read_clip",
    "read_mask",
    "resample_clip",
    "read_video",
    "seam_ratio",
    "seam_strip",
    "write_sidecar",
]
