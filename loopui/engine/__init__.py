"""Sampling: Mobius latent shift, RoPE scaling, wrapping windows, frame-invariant decoding, image conditioning.

Names are imported lazily, so ``import loopui.engine`` (and the CLI's ``--help``) stays fast and torch is only
imported when the sampler is used. Nothing here touches a GPU, the network or weights at import time.
"""

from __future__ import annotations

import importlib
from typing import Any

from .errors import LoopInterrupted, NonFiniteOutput, PipelineBusy
from .request import LoopRequest, default_shift_skip, knob_info, latent_length

_LAZY = {
    "LoopResult": ".loop", "generate_loop": ".loop", "pipeline_spec": ".loop",
    "LoopPlan": ".plan", "plan_loop": ".plan", "resolve_request": ".plan", "SEAM_POLISH_PRESETS": ".polish",
    "RenderResult": ".render", "render_loop": ".render",
}

__all__ = ["LoopInterrupted", "LoopRequest", "NonFiniteOutput", "PipelineBusy", "default_shift_skip", "knob_info",
           "latent_length", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
