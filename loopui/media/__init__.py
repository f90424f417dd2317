"""Media room: seam metrics, video export/read-back, sidecars, seam strips, reference images and masks.

A leaf package: it imports only numpy, PIL, imageio and the standard library (imageio lazily), never torch,
the engine or gradio.
"""

from loopui.media.export import SUPPORTED_SUFFIXES, export_video, read_video, seam_strip, write_sidecar
from loopui.media.images import ImageInputError, load_mask_image, load_reference_image, open_image, read_mask
from loopui.media.metrics import LoopMetrics, loop_metrics, seam_ratio

__all__ = [
    "SUPPORTED_SUFFIXES",
    "ImageInputError",
    "LoopMetrics",
    "export_video",
    "load_mask_image",
    "load_reference_image",
    "loop_metrics",
    "open_image",
    "read_mask",
    "read_video",
    "seam_ratio",
    "seam_strip",
    "write_sidecar",
]
