"""Hugging Face ZeroGPU: whether this process runs on a ZeroGPU Space, and how many GPU seconds to ask it for.

The ``spaces.GPU`` decorator itself is the page's (``loopui.ui.zerogpu``): it wraps a Gradio event and reads
Gradio's request context.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

from loopui.engine.request import latent_length

logger = logging.getLogger(__name__)

# GPU seconds per denoising step at a model's native size and trained length (classifier-free guidance included) on
# an H100/H200-class GPU. From CogVideoX's model cards (50 steps on one H100: ~90 s for 5B, ~45 s for 2B); not
# measured here. Other models: scaled from the 5B figure by their VRAM estimate.
GPU_STEP_SECONDS: dict[str, float] = {"THUDM/CogVideoX-5b": 1.8, "THUDM/CogVideoX-5b-I2V": 1.8,
                                      "THUDM/CogVideoX-2b": 0.9}
GPU_DECODE_SECONDS = 15.0  # tiled VAE decode of the trained length at the native size (rough)
GPU_OVERHEAD_SECONDS = 10.0  # prompt encoding, moving tensors, export
GPU_SAFETY = 1.3
ZERO_GPU_MIN_SECONDS, ZERO_GPU_MAX_SECONDS = 30, 300


def on_zero_gpu() -> bool:
    """Whether this process runs on a ZeroGPU Space (``SPACES_ZERO_GPU`` set and the ``spaces`` package present)."""
    if os.environ.get("SPACES_ZERO_GPU", "").strip().lower() not in ("1", "true", "yes"):
        return False
    try:
        import spaces  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        logger.warning("SPACES_ZERO_GPU is set but the spaces package is missing: running as a plain GPU app")
        return False
    return True


def estimate_gpu_seconds(spec: Any, values: dict) -> int:
    """GPU seconds one generation needs with these settings (what to ask ZeroGPU for), with a safety margin.

    A visitor whose remaining quota is below the request is refused up front, so asking for a fixed 300 s turned
    free visitors away even for a 4-step preview. Per-step cost grows with the number of tokens (latent frames x
    area): half linear (MLPs), half quadratic (attention); window mode costs one trained-length pass per window;
    seam polish adds its extra passes; guidance 1 makes one model call per step instead of two; a speed recipe
    (``values["recipe"]``) counts with the values it fills.
    """
    from loopui.engine.plan import apply_recipe
    from loopui.engine.polish import polish_cost
    from loopui.engine.request import parse_sigmas

    values, _ = apply_recipe(values, spec, values.get("recipe"))
    sigmas = parse_sigmas(values.get("sigmas"))
    # Empty: one step per sigma, else the model's own.
    steps = max(1, int(values.get("num_inference_steps") or (len(sigmas) if sigmas else spec.num_inference_steps)))
    frames = int(values.get("num_frames") or spec.native_num_frames)
    height = int(values.get("height") or spec.native_height)
    width = int(values.get("width") or spec.native_width)
    length = latent_length(frames, spec.temporal_compression)
    trained = spec.trained_latent_frames
    area = (height * width) / float(spec.native_height * spec.native_width)
    per_step = GPU_STEP_SECONDS.get(spec.model_id, 1.8 * spec.vram_gb / 26.0)
    if values.get("window_mode") == "window" and length > trained:
        passes, tokens = math.ceil(length / (trained - trained // 2)), area
    else:
        passes, tokens = 1, area * length / trained
    step_seconds = per_step * passes * (tokens + tokens**2) / 2.0
    guidance = values.get("guidance_scale")
    if guidance not in (None, "", "auto") and float(guidance) == 1.0:
        step_seconds /= 2.0  # no classifier-free guidance: no unconditional pass
    level = values.get("seam_polish") or "off"
    # A sigma list is the flow model's noise fraction before each step (then 0 after the last).
    fractions = list(sigmas) + [0.0] if sigmas and len(sigmas) == steps else None
    polish = polish_cost(level, steps, fractions) if level in ("off", "fast", "balanced", "strong") else 1.0
    decode = GPU_DECODE_SECONDS * area * length / trained
    total = GPU_SAFETY * (steps * step_seconds * polish + decode + GPU_OVERHEAD_SECONDS)
    return int(min(ZERO_GPU_MAX_SECONDS, max(ZERO_GPU_MIN_SECONDS, math.ceil(total))))
