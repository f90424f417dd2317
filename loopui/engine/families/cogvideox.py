"""CogVideoX (2b, 5b, 5b-I2V): latents ``(B, T, C, H, W)``, I2V image latents concatenated on C.

- Rotary tables come from the pipeline's ``_prepare_rotary_positional_embeddings`` (time-major rows, temporal
  channels first): NTK scaling swaps the temporal channels; a window takes the first rows of the table.
- CFG stacks the unconditional and conditional halves on B in one transformer call per step.
- The causal VAE decodes the first latent into 1 frame and every other into 4.
- Schedulers: CogVideoX DDIM / DPM (v-prediction), trailing timesteps.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch

from loopui.models.family_facts import CogVideoXFacts

from ..rope import DEFAULT_THETA, ntk_theta, temporal_frequencies
from .base import Family, patch_attribute

logger = logging.getLogger(__name__)


def temporal_rope_dim(attention_head_dim: int) -> int:
    """Rotary channels CogVideoX gives to time (``d_t``): a quarter of the head dimension (16 for CogVideoX-5b)."""
    return attention_head_dim // 4


def replace_temporal_rope(
    freqs: tuple[torch.Tensor, torch.Tensor], num_frames: int, temporal_dim: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Swap the temporal channels of a CogVideoX 3D rotary table for ones built with base ``theta``.

    CogVideoX lays its table out as ``(T * H * W, d_t + d_h + d_w)``, time-major, temporal channels first; the spatial
    channels are left exactly as they were.
    """
    cos, sin = freqs
    rows, dim = cos.shape
    if rows % num_frames:
        raise ValueError(f"rotary table of {rows} rows does not split into {num_frames} frames")
    t_cos, t_sin = temporal_frequencies(num_frames, temporal_dim, theta)
    out = []
    for table, temporal in ((cos, t_cos), (sin, t_sin)):
        table = table.clone().view(num_frames, rows // num_frames, dim)
        table[:, :, :temporal_dim] = temporal.to(device=table.device, dtype=table.dtype)[:, None, :]
        out.append(table.view(rows, dim))
    return out[0], out[1]


def scaled_rope_preparer(pipe: Any, rope_scale: float):
    """A drop-in for ``pipe._prepare_rotary_positional_embeddings`` that applies NTK scaling to time only.

    ``rope_scale == 1`` returns the stock function's tables untouched (bit-for-bit).
    """
    stock = pipe._prepare_rotary_positional_embeddings
    temporal_dim = temporal_rope_dim(pipe.transformer.config.attention_head_dim)
    theta = ntk_theta(DEFAULT_THETA, rope_scale, temporal_dim)

    def prepare(height: int, width: int, num_frames: int, device: torch.device):
        freqs = stock(height, width, num_frames, device)
        if rope_scale == 1.0:
            return freqs
        return replace_temporal_rope(freqs, num_frames, temporal_dim, theta)

    return prepare


class CogVideoXFamily(Family, CogVideoXFacts):
    time_dim = 1
    channel_dim = 2
    flow_matching = False
    schedulers = ("ddim", "dpm")

    def latent_channels(self, pipe: Any) -> int:
        return int(pipe.transformer.config.out_channels)

    def build_scheduler(self, name: str, config: Any, flow_shift: Optional[float] = None) -> Any:
        from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler

        classes = {"ddim": CogVideoXDDIMScheduler, "dpm": CogVideoXDPMScheduler}
        if name not in classes:
            raise ValueError(f"scheduler must be one of {', '.join(classes)} for CogVideoX; got {name!r}")
        return classes[name].from_config(config, timestep_spacing="trailing")

    def check_request(self, request: Any, spec: Any, length: int) -> list[str]:
        if getattr(request, "flow_shift", None) is not None:
            raise ValueError("flow_shift applies to flow-matching models (Wan) only; CogVideoX uses DDIM/DPM: "
                             "leave flow_shift empty")
        if spec.learned_positions:
            _check_learned_positions(request, spec, length)
        return []

    def call_kwargs(self, pipe: Any, request: Any, plan: Any) -> dict:
        return {"use_dynamic_cfg": bool(plan.use_dynamic_cfg)}

    def clip_kwargs(self, kwargs: dict, frames: torch.Tensor, length: int) -> dict:
        rotary = kwargs.get("image_rotary_emb")
        if rotary is None or len(frames) == length:
            # A rotation of the whole cycle keeps positions 0..L-1: the model sees the rotated clip as a clip.
            return kwargs
        # The table is time-major with positions 0..L-1: its first rows are the positions a shorter clip sees.
        rows = rotary[0].shape[0] // length * len(frames)
        return {**kwargs, "image_rotary_emb": (rotary[0][:rows], rotary[1][:rows])}

    @contextmanager
    def rope_scaled(self, pipe: Any, rope_scale: float) -> Iterator[None]:
        if not pipe.transformer.config.use_rotary_positional_embeddings:
            yield
            return
        with patch_attribute(pipe, "_prepare_rotary_positional_embeddings", scaled_rope_preparer(pipe, rope_scale)):
            yield

    def pull_solver_history(self, scheduler: Any, arguments: dict, conditioning: Any) -> None:
        # CogVideoXDPMScheduler takes the previous step's clean estimate as an argument (the pipeline keeps it).
        old = arguments.get("old_pred_original_sample")
        if old is not None:
            arguments["old_pred_original_sample"] = conditioning.pull_history(old)

    def condition_latent_channels(self, pipe: Any) -> Optional[tuple[int, int]]:
        if type(pipe).__name__ != "CogVideoXImageToVideoPipeline":
            return None
        return 0, self.latent_channels(pipe)

    @torch.no_grad()
    def encode_video(self, pipe: Any, frames: Any, height: int, width: int, device: Any,
                     dtype: torch.dtype) -> torch.Tensor:
        pixels = self._pixels(pipe, frames, height, width).to(device=device, dtype=pipe.vae.dtype)  # (1, 3, F, H, W)
        latent = pipe.vae.encode(pixels).latent_dist.mode()  # (1, C, L, h, w)
        latent = latent.permute(0, 2, 1, 3, 4) * pipe.vae_scaling_factor_image  # (1, L, C, h, w)
        return latent.to(device=device, dtype=dtype)

    def decode(self, pipe: Any, latents: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        return pipe.decode_latents(latents.to(dtype or pipe.vae.dtype))  # (B, C, F, H, W)


def _check_learned_positions(request: Any, spec: Any, length: int) -> None:
    """A learned positional table fits one size and one clip length: refuse what diffusers would silently change."""
    height = request.height or spec.native_height
    width = request.width or spec.native_width
    if (height, width) != (spec.native_height, spec.native_width):
        raise ValueError(f"height/width: {spec.model_id or 'this model'} has learned positional embeddings and runs "
                         f"only at {spec.native_width}x{spec.native_height}: leave height/width empty "
                         f"(got {width}x{height})")
    trained = spec.trained_latent_frames
    if length < trained:
        raise ValueError(f"num_frames: {request.num_frames} is too short for {spec.model_id or 'this model'}: its "
                         f"learned positional embeddings need at least {spec.trained_num_frames} frames "
                         f"({trained} latents)")
    if length > trained and request.window_mode == "full":
        raise ValueError(f"window_mode: num_frames={request.num_frames} ({length} latents) in full mode would "
                         f"replace {spec.model_id or 'this model'}'s learned positional embeddings (trained for "
                         f"{trained} latents) with a table it never saw: use window_mode 'window' or "
                         f"{spec.trained_num_frames} frames")
    if request.rope_scale not in (None, 1, 1.0) and request.window_mode == "window":
        raise ValueError("rope_scale must be 1 in window mode on a model with learned positional embeddings")
