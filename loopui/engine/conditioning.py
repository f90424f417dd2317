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
from typing import Any, Optional

import torch
import torch.nn.functional as F

from .noise import NoiseLevel, noised, prediction_for

logger = logging.getLogger(__name__)


@dataclass
class ImageConditioning:
    """Per-generation state of the image controls, in the family's latent layout (time on ``time_dim``).

    Noise levels come from ``level(index)`` (the family's view of the scheduler), so the same code serves
    DDPM-style and flow-matching schedulers.
    """

    reference: torch.Tensor  # one-frame latent of the reference image, e.g. (1, 1, C, h, w) CogVideoX
    noise: torch.Tensor  # same shape: one noise shared by all frames (anchor and freeze targets)
    motion_mask: Optional[torch.Tensor]  # (1, 1, 1, h, w), 1 = may move; None = everywhere
    anchor_strength: float
    init_strength: float
    background_freeze: float
    num_steps: int
    prediction_type: str
    time_dim: int = 1
    channel_dim: int = 2
    initial_noise: Optional[torch.Tensor] = None  # the pipeline's own starting noise, read at its first step
    pixel_motion: Optional[Any] = None  # (H, W) float32 pixel motion mask, 1 = may move (for the pixel freeze)
    last_pull: Optional[torch.Tensor] = None  # weights of the latest after-step pull (for the solver's history)
    reference_from_model: bool = False  # the reference was read off the I2V conditioning the model sees

    @property
    def init_steps(self) -> int:
        """Steps replaced by the noised reference: ``floor((1 - s) * N)``."""
        return int(math.floor((1.0 - self.init_strength) * self.num_steps + 1e-9))

    @property
    def active(self) -> bool:
        return self.anchor_strength > 0 or self.init_steps > 0 or self.background_freeze > 0

    def use_model_condition(self, condition: torch.Tensor, latent_start: int, latent_count: int) -> None:
        """Anchor to the very latent an I2V model is conditioned on: its conditioning's first frame (CogVideoX-I2V
        samples it from the VAE's distribution with the pipeline's generator, so it differs from the mode)."""
        if self.reference_from_model:
            return
        first = condition.narrow(self.channel_dim, latent_start, latent_count).narrow(self.time_dim, 0, 1)[:1]
        self.reference = first.detach().to(self.reference.device, self.reference.dtype).clone()
        self.reference_from_model = True

    # -- hooks --------------------------------------------------------------------------------------------------
    def override_prediction(self, step: int, noisy: torch.Tensor, level: NoiseLevel) -> Optional[torch.Tensor]:
        """During the init-strength steps, the exact prediction whose clean estimate is the reference."""
        if step >= self.init_steps:
            return None
        out = prediction_for(noisy, self.reference.to(noisy.device), level, self.prediction_type)
        return out.to(noisy.dtype)

    def after_step(self, step: int, latents: torch.Tensor, next_level: NoiseLevel) -> torch.Tensor:
        """Apply init / freeze / anchor pulls to the latents the scheduler just produced (level of step + 1)."""
        self.last_pull = None
        if step < self.init_steps and self.initial_noise is not None:
            # Snap onto the exact noised reference (the oracle prediction got within float error of it).
            return noised(self.reference.to(latents.device), self.initial_noise.to(latents.device, latents.dtype),
                          next_level).to(latents.dtype)
        target = noised(self.reference.to(latents.device), self.noise.to(latents.device, latents.dtype), next_level)
        target = target.to(latents.dtype)  # one frame
        keep = torch.ones_like(latents)  # 1 - the pull weight, composed over the pulls below
        if self.background_freeze > 0:
            still = 1.0 - (self.motion_mask if self.motion_mask is not None else torch.zeros_like(target))
            weight = (self.background_freeze * still).to(latents.device, latents.dtype).expand_as(latents)
            # lerp is exact at the ends (weight 1 gives the target bit-for-bit).
            latents = torch.lerp(latents, target.expand_as(latents), weight)
            keep = keep * (1.0 - weight)
        if self.anchor_strength > 0:
            latents = latents.clone()
            first = latents.narrow(self.time_dim, 0, 1)
            first.copy_(torch.lerp(first, target.expand_as(first), self.anchor_strength))
            keep.narrow(self.time_dim, 0, 1).mul_(1.0 - self.anchor_strength)
        self.last_pull = 1.0 - keep
        return latents

    def pull_history(self, history: torch.Tensor) -> torch.Tensor:
        """A multistep solver's stored clean estimate, pulled toward the reference with the latest pull's weights:
        the solver's next update then starts from latents and a history that agree."""
        if self.last_pull is None:
            return history
        weight = self.last_pull.to(history.device, history.dtype)
        return torch.lerp(history, self.reference.to(history.device, history.dtype).expand_as(history),
                          weight.expand_as(history))


def mask_to_latent_grid(mask, height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Downsample a pixel mask ``(H, W)`` in [0, 1] to ``(1, 1, 1, height, width)`` by area (keeps feathering)."""
    m = torch.as_tensor(mask, dtype=torch.float32)
    if m.dim() != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {tuple(m.shape)}")
    m = F.interpolate(m[None, None], size=(height, width), mode="area")[0, 0]
    return m.clamp(0, 1).to(device=device, dtype=dtype)[None, None, None]
