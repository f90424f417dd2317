"""Frame-invariant decoding of a latent cycle with a causal 3D VAE (any family)."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

DEFAULT_CONTEXT_LATENTS = 2


def decoded_frame_count(num_latents: int, temporal_compression: int, frame_invariant: bool) -> int:
    """Frames a cycle of ``num_latents`` plays as: ``r * L`` frame-invariant (52 for 13), else ``1 + r * (L - 1)``."""
    if frame_invariant:
        return temporal_compression * num_latents
    return 1 + temporal_compression * (num_latents - 1)


def decode_cycle(pipe: Any, latents: torch.Tensor, frame_invariant: bool = True,
                 context: int | None = None, family: Any = None) -> torch.Tensor:
    """Decode a cycle's latents (the family's layout) to a video tensor ``(B, C, F, H, W)``.

    A causal VAE decodes its first latent into 1 frame and every other latent into ``r`` frames with the previous
    latents as context. Frame-invariant decoding borrows the last ``context`` latents of the cycle as context before
    the first one, decodes, and drops the frames of the borrowed latents: every latent of the cycle is decoded as a
    non-first latent, so the loop plays ``r * L`` evenly made frames and the wrap has no doubled frame.
    """
    if family is None:
        from .families import family_for

        family = family_for(pipe)
    if not frame_invariant:
        return family.decode(pipe, latents)
    time_dim = family.time_dim
    num_latents = latents.shape[time_dim]
    ratio = pipe.vae_scale_factor_temporal
    context = family.decode_context if context is None else context
    context = max(1, min(context, num_latents))
    padded = torch.cat([latents.narrow(time_dim, num_latents - context, context), latents], dim=time_dim)
    video = family.decode(pipe, padded)  # (B, C, F, H, W)
    keep = ratio * num_latents
    if video.shape[2] < keep:
        raise RuntimeError(f"VAE returned {video.shape[2]} frames for {padded.shape[time_dim]} latents; "
                           f"expected >= {keep}")
    return video[:, :, video.shape[2] - keep:]


def video_to_uint8(pipe: Any, video: torch.Tensor) -> np.ndarray:
    """The pipeline's own post-processing, then ``(F, H, W, 3)`` uint8 for the first video of the batch."""
    frames = pipe.video_processor.postprocess_video(video=video.float(), output_type="np")[0]
    return np.clip(np.round(np.asarray(frames) * 255.0), 0, 255).astype(np.uint8)
