"""Reference-image loops: anchor the cycle's frame 0, start from the noised image, freeze the background.

Three independent controls, each in [0, 1] and inert without an image:

- ``anchor_strength`` a: after every scheduler step the cycle's first latent is pulled toward the reference latent
  noised to the next step's level (weight a). At a = 1 the final first latent *is* the reference latent.
- ``init_strength`` s: the cycle starts from the reference latent noised to the level of step ``floor((1 - s) N)``
  (SDEdit-style) instead of pure noise; s = 1 is pure noise. The skipped steps are not run through the model: an exact
  "oracle" prediction walks the scheduler along the noised reference, keeping multistep schedulers' state consistent.
- ``background_freeze`` b with motion mask M (1 = may move, area-downsampled to the latent grid so feathering
  survives): after every step, outside M every frame is pulled toward the same noised reference latent (one noise
  for all frames) with weight b. At b = 1 the background of every latent frame ends identical.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


@dataclass
class ImageConditioning:
    """Per-generation state of the image controls. Latent layout: CogVideoX ``(B, T, C, H, W)``."""

    reference: torch.Tensor  # (1, 1, C, h, w) encoded reference image
    noise: torch.Tensor  # (1, 1, C, h, w) one noise shared by all frames (anchor and freeze targets)
    motion_mask: Optional[torch.Tensor]  # (1, 1, 1, h, w), 1 = may move; None = everywhere
    anchor_strength: float
    init_strength: float
    background_freeze: float
    num_steps: int
    prediction_type: str
    initial_noise: Optional[torch.Tensor] = None  # (B, T, C, h, w) the pipeline-shaped starting noise

    @property
    def init_steps(self) -> int:
        """Steps replaced by the noised reference: ``floor((1 - s) * N)``."""
        return int(math.floor((1.0 - self.init_strength) * self.num_steps + 1e-9))

    @property
    def active(self) -> bool:
        return self.anchor_strength > 0 or self.init_steps > 0 or self.background_freeze > 0

    # -- helpers ------------------------------------------------------------------------------------------------
    def _noised(self, scheduler, target: torch.Tensor, noise: torch.Tensor, timestep) -> torch.Tensor:
        target = target.expand_as(noise).to(noise.dtype)
        if timestep is None:  # past the last step: the clean level
            return target
        t = torch.as_tensor(timestep, device=noise.device).reshape(1).long()
        return scheduler.add_noise(target, noise, t)

    def initial_latents(self, scheduler, noise: torch.Tensor, first_timestep) -> torch.Tensor:
        """Starting latents: the pipeline's noise, or the reference noised with it to the first step's level."""
        self.initial_noise = noise
        if self.init_steps == 0:
            return noise
        return self._noised(scheduler, self.reference, noise, first_timestep)

    # -- hooks --------------------------------------------------------------------------------------------------
    def override_prediction(self, scheduler, step: int, hidden_states: torch.Tensor,
                            timestep: torch.Tensor) -> Optional[torch.Tensor]:
        """During the init-strength steps, the exact prediction whose clean estimate is the reference."""
        if step >= self.init_steps:
            return None
        channels = self.reference.shape[2]
        x_t = hidden_states[:, :, :channels].float()
        t = int(torch.as_tensor(timestep).reshape(-1)[0])
        alpha = scheduler.alphas_cumprod.to(x_t.device)[t].float()
        x0 = self.reference.to(x_t.device).float().expand_as(x_t)
        sqrt_a, sqrt_1ma = alpha.sqrt(), (1 - alpha).clamp_min(1e-12).sqrt()
        eps = (x_t - sqrt_a * x0) / sqrt_1ma
        if self.prediction_type == "v_prediction":
            out = sqrt_a * eps - sqrt_1ma * x0
        elif self.prediction_type == "epsilon":
            out = eps
        elif self.prediction_type == "sample":
            out = x0
        else:
            raise ValueError(f"unsupported prediction type {self.prediction_type!r}")
        return out.to(hidden_states.dtype)

    def after_step(self, scheduler, step: int, latents: torch.Tensor, timesteps) -> torch.Tensor:
        """Apply init / freeze / anchor pulls to the latents the scheduler just produced (level of step + 1)."""
        next_t = timesteps[step + 1] if step + 1 < len(timesteps) else None
        if step < self.init_steps and self.initial_noise is not None:
            # Snap onto the exact noised reference (the oracle prediction got within float error of it).
            return self._noised(scheduler, self.reference, self.initial_noise.to(latents.dtype), next_t).to(
                latents.dtype)
        target = self._noised(scheduler, self.reference, self.noise.to(latents.device, latents.dtype), next_t)
        target = target.to(latents.dtype)  # (1, 1, C, h, w)
        if self.background_freeze > 0:
            still = 1.0 - (self.motion_mask if self.motion_mask is not None else torch.zeros_like(target[:, :, :1]))
            weight = (self.background_freeze * still).to(latents.device, latents.dtype)
            # lerp is exact at the ends (weight 1 gives the target bit-for-bit).
            latents = torch.lerp(latents, target.expand_as(latents), weight.expand_as(latents))
        if self.anchor_strength > 0:
            latents = latents.clone()
            latents[:, :1] = torch.lerp(latents[:, :1], target, self.anchor_strength)
        return latents


def mask_to_latent_grid(mask, height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Downsample a pixel mask ``(H, W)`` in [0, 1] to ``(1, 1, 1, height, width)`` by area (keeps feathering)."""
    m = torch.as_tensor(mask, dtype=torch.float32)
    if m.dim() != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {tuple(m.shape)}")
    m = F.interpolate(m[None, None], size=(height, width), mode="area")[0, 0]
    return m.clamp(0, 1).to(device=device, dtype=dtype)[None, None, None]


@torch.no_grad()
def encode_reference(pipe, image, height: int, width: int, device, dtype) -> torch.Tensor:
    """Encode a PIL reference image with the pipeline's VAE as a one-frame video: ``(1, 1, C, h, w)``."""
    pixels = pipe.video_processor.preprocess(image, height=height, width=width)  # (1, 3, H, W) in [-1, 1]
    pixels = pixels.unsqueeze(2).to(device=device, dtype=pipe.vae.dtype)  # (1, 3, 1, H, W)
    latent = pipe.vae.encode(pixels).latent_dist.mode()  # (1, C, 1, h, w)
    latent = latent.permute(0, 2, 1, 3, 4) * pipe.vae_scaling_factor_image
    return latent.to(device=device, dtype=dtype)
