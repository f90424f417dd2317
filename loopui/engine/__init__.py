"""Sampling: Mobius latent shift, RoPE scaling, wrapping windows, frame-invariant decoding, image conditioning.

Importing this package imports torch but touches no GPU, network or weights.
"""

from .loop import LoopInterrupted, LoopResult, PipelineInfo, generate_loop, pipeline_info
from .polish import SEAM_POLISH_PRESETS
from .render import RenderResult, render_loop
from .settings import LoopRequest, default_shift_skip, knob_info, latent_length

__all__ = [
    "LoopInterrupted", "LoopRequest", "LoopResult", "PipelineInfo", "RenderResult", "SEAM_POLISH_PRESETS",
    "default_shift_skip", "generate_loop", "knob_info", "latent_length", "pipeline_info", "render_loop",
]
