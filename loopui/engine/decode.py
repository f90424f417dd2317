"""Frame-invariant decoding of a latent cycle with a causal 3D VAE (any family), in the family's decode dtype.

Measured on the faithful VAEs (random weights) in ``docs/vae_decode.md``: the decode dtype's pixel error, the
wrap-seam error against the number of borrowed context latents, and the decode time before and after.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import numpy as np
import torch

from .guards import _on_accelerator

logger = logging.getLogger(__name__)

DEFAULT_CONTEXT_LATENTS = 2


def decoded_frame_count(num_latents: int, temporal_compression: int, frame_invariant: bool) -> int:
    """Frames a cycle of ``num_latents`` plays as: ``r * L`` frame-invariant (52 for 13), else ``1 + r * (L - 1)``."""
    if frame_invariant:
        return temporal_compression * num_latents
    return 1 + temporal_compression * (num_latents - 1)


def decode_dtype(pipe: Any, family: Any) -> torch.dtype:
    """The dtype ``pipe``'s VAE decodes in: the family's ``vae_decode_dtype`` on an accelerator when the pipeline
    runs its transformer narrower than its VAE (a float32 VAE beside a bfloat16 transformer, as diffusers' Wan
    examples load it); otherwise the VAE's own -- a float16 VAE the model card chose stays float16, a pipeline
    loaded in float32 on purpose decodes in float32, and a CPU decodes in the VAE's dtype (half-precision
    convolutions are slow there)."""
    vae_dtype = pipe.vae.dtype
    if not _on_accelerator(pipe) or family.transformer_dtype(pipe).itemsize >= vae_dtype.itemsize:
        return vae_dtype
    return getattr(torch, family.vae_decode_dtype)


@contextmanager
def decode_precision(pipe: Any, dtype: torch.dtype) -> Iterator[torch.dtype]:
    """Run ``pipe``'s VAE in ``dtype`` for a block without leaving it recast; yields the dtype the latents go in as.

    A narrower dtype runs through autocast on the device the pipeline executes on (under CPU offload the weights
    rest on the CPU or the meta device between calls, so their own device would be the wrong one): the weights are
    untouched, so the encoder and other pipelines sharing the VAE see no change, and the latents go in in the VAE's
    dtype. A wider dtype casts the VAE up and back down after, which is exact (every bfloat16/float16 value is a
    float32 value)."""
    vae = pipe.vae
    vae_dtype = vae.dtype
    if dtype == vae_dtype:
        yield dtype
        return
    if dtype.itemsize < vae_dtype.itemsize:
        device_type = torch.device(pipe._execution_device).type
        with torch.autocast(device_type=device_type, dtype=dtype):
            yield vae_dtype
        return
    vae.to(dtype=dtype)
    try:
        yield dtype
    finally:
        vae.to(dtype=vae_dtype)


def _stream(latents: torch.Tensor, time_dim: int, context: int) -> torch.Tensor:
    """The cycle followed by its first ``context`` latents again: one causal pass decodes latent 0 first and alone,
    and the cycle's first latents a second time at the end, after the cycle's last ones as their context."""
    return torch.cat([latents, latents.narrow(time_dim, 0, context)], dim=time_dim)


def decode_cycle(pipe: Any, latents: torch.Tensor, frame_invariant: bool = True,
                 context: int | None = None, family: Any = None, dtype: Optional[torch.dtype] = None,
                 with_first: bool = False) -> Any:
    """Decode a cycle's latents (the family's layout) to a video tensor ``(B, C, F, H, W)``.

    A causal VAE decodes its first latent into 1 frame and every other latent into ``r`` frames with the previous
    latents as context. Frame-invariant decoding decodes the cycle once in order and continues the same causal
    stream over its first ``context`` latents (the family's measured ``decode_context``): every latent kept is
    decoded as a non-first latent with at least ``context`` cycle latents before it, so the loop plays ``r * L``
    evenly made frames and the wrap, decoded in one stream, has no doubled frame. ``dtype`` defaults to
    :func:`decode_dtype`. ``with_first=True`` returns ``(video, first)``: ``first`` is the stream's first latent
    decoded with nothing before it, as it would be alone (None where the family's decoder does not decode it so:
    CogVideoX normalises a batch of latents together).
    """
    if family is None:
        from .families import family_for

        family = family_for(pipe)
    dtype = decode_dtype(pipe, family) if dtype is None else dtype
    first = None
    with decode_precision(pipe, dtype) as latent_dtype:
        if not frame_invariant:
            video = family.decode(pipe, latents, latent_dtype)
        else:
            time_dim = family.time_dim
            num_latents = latents.shape[time_dim]
            ratio = pipe.vae_scale_factor_temporal
            context = family.decode_context if context is None else context
            context = max(1, min(context, num_latents))
            streamed = family.decode(pipe, _stream(latents, time_dim, context), latent_dtype)  # (B, C, F, H, W)
            keep = ratio * num_latents
            if streamed.shape[2] < keep:
                raise RuntimeError(f"VAE returned {streamed.shape[2]} frames for {num_latents + context} latents; "
                                   f"expected >= {keep}")
            # The last r * L frames are the cycle from latent `context` on, then its first `context` latents.
            video = torch.roll(streamed[:, :, streamed.shape[2] - keep:], shifts=ratio * context, dims=2)
            if family.first_latent_decodes_alone:
                first = streamed[:, :, : streamed.shape[2] - ratio * (num_latents + context - 1)]
    return (video, first) if with_first else video


def decode_with_still(pipe: Any, latents: torch.Tensor, reference: Optional[torch.Tensor], frame_invariant: bool,
                      family: Any) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The cycle's video and, when ``reference`` (a one-latent still) is given, the still decoded alone.

    An anchored loop's first latent *is* its reference (anchor strength 1): where the family's stream decodes its
    first latent alone, the still is that first latent's frame and is not decoded a second time.
    """
    if reference is None:
        return decode_cycle(pipe, latents, frame_invariant=frame_invariant, family=family), None
    first = latents.narrow(family.time_dim, 0, 1)
    first_is_reference = torch.equal(first, reference.to(first.device, first.dtype))
    if frame_invariant and first_is_reference and family.first_latent_decodes_alone:
        video, still = decode_cycle(pipe, latents, frame_invariant=True, family=family, with_first=True)
        if still is not None:
            return video, still
    video = decode_cycle(pipe, latents, frame_invariant=frame_invariant, family=family)
    with decode_precision(pipe, decode_dtype(pipe, family)) as latent_dtype:
        return video, family.decode(pipe, reference, latent_dtype)


def video_to_uint8(pipe: Any, video: torch.Tensor) -> np.ndarray:
    """The pipeline's own post-processing, then ``(F, H, W, 3)`` uint8 for the first video of the batch."""
    frames = pipe.video_processor.postprocess_video(video=video.float(), output_type="np")[0]
    return np.clip(np.round(np.asarray(frames) * 255.0), 0, 255).astype(np.uint8)
