"""Reference-image and clip loops: anchor the cycle's frame 0, start from the noised image or clip, freeze the
background, hold a clip outside the wrap.

Independent controls, each in [0, 1] and inert without an image or clip:

- ``anchor_strength`` a (images): after every scheduler step the cycle's first latent is pulled toward the reference
  latent noised to the next step's level (weight a). At a = 1 the final first latent *is* the reference latent.
- ``init_strength`` s: the cycle starts from the reference (an image: every frame; a clip: its own frames) noised to
  the level of step ``floor((1 - s) N)`` (SDEdit-style) instead of pure noise; s = 1 is pure noise. The skipped steps
  are not run through the model: an exact "oracle" prediction walks the scheduler from the pipeline's own noise along
  the noised reference, keeping every random draw in the stock pipeline's order.
- ``background_freeze`` b with motion mask M (1 = may move, area-downsampled to the latent grid so feathering
  survives): after every step, outside M every frame is pulled toward the same noised still (the image, or a clip's
  first frame; one noise for all frames) with weight b. At b = 1 the background of every latent frame ends identical.
- ``loop_region`` r (clips): the latents farther than r·L/2 from the wrap are pulled toward the clip's own latents
  (noised alike, per frame), with a taper of one latent or a fifth of the cycle: only the part around the wrap
  changes, through the same mechanism as the freeze, along time instead of space.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F

from .noise import NoiseLevel, noised, prediction_for

logger = logging.getLogger(__name__)


def wrap_hold(length: int, loop_region: float) -> torch.Tensor:
    """``(L,)`` float32 hold weights of a clip's latents: 0 within ``loop_region * L / 2`` latents of the wrap (they
    may change), rising linearly to 1 over a taper of ``max(1, L / 5)`` latents beyond it (held to the clip)."""
    if loop_region >= 1.0:
        return torch.zeros(length)
    k = torch.arange(length, dtype=torch.float64)
    distance = torch.minimum(k + 0.5, length - 0.5 - k)  # from the wrap, between latents L-1 and 0
    free_half = loop_region * length / 2.0
    taper = max(1.0, length / 5.0)
    return ((distance - free_half) / taper).clamp(0.0, 1.0).float()


@dataclass
class ImageConditioning:
    """Per-generation state of the image / clip controls, in the family's latent layout (time on ``time_dim``).

    Noise levels come from ``level(index)`` (the family's view of the scheduler), so the same code serves
    DDPM-style and flow-matching schedulers.
    """

    reference: torch.Tensor  # one-frame latent of the still (the image, a clip's first frame), e.g. (1, 1, C, h, w)
    noise: torch.Tensor  # same shape: one noise shared by all frames (anchor and freeze targets)
    motion_mask: Optional[torch.Tensor]  # (1, 1, 1, h, w), 1 = may move; None = everywhere
    anchor_strength: float
    init_strength: float
    background_freeze: float
    num_steps: int
    prediction_type: str
    time_dim: int = 1
    channel_dim: int = 2
    clip: Optional[torch.Tensor] = None  # a clip's L latents (the cycle's shape): start and hold targets
    clip_noise: Optional[torch.Tensor] = None  # their own noise (per frame: a clip moves)
    hold: Optional[torch.Tensor] = None  # (L,) clip hold weights along time (1 = held to the clip)
    initial_noise: Optional[torch.Tensor] = None  # the pipeline's own starting noise, read at its first step
    pixel_motion: Optional[Any] = None  # (H, W) float32 pixel motion mask, 1 = may move (for the pixel freeze)
    pulls: list = field(default_factory=list)  # (clean target, weights) of the latest after-step pulls, in order
    reference_from_model: bool = False  # the reference was read off the I2V conditioning the model sees

    @property
    def init_steps(self) -> int:
        """Steps replaced by the noised reference: ``floor((1 - s) * N)``."""
        return int(math.floor((1.0 - self.init_strength) * self.num_steps + 1e-9))

    @property
    def start(self) -> torch.Tensor:
        """What the init strength starts from: the clip, else the still in every frame."""
        return self.clip if self.clip is not None else self.reference


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
        """During the init-strength steps, the exact prediction whose clean estimate is the start."""
        if step >= self.init_steps:
            return None
        out = prediction_for(noisy, self.start.to(noisy.device), level, self.prediction_type)
        return out.to(noisy.dtype)

    def after_step(self, step: int, latents: torch.Tensor, next_level: NoiseLevel) -> torch.Tensor:
        """Apply init / hold / freeze / anchor pulls to the latents the scheduler just produced (level of step + 1)."""
        self.pulls = []
        if step < self.init_steps and self.initial_noise is not None:
            # Snap onto the exact noised start (the oracle prediction got within float error of it).
            return noised(self.start.to(latents.device), self.initial_noise.to(latents.device, latents.dtype),
                          next_level).to(latents.dtype)
        if self.hold is not None and self.clip is not None and bool(self.hold.any()):
            target = noised(self.clip.to(latents.device), self.clip_noise.to(latents.device, latents.dtype),
                            next_level).to(latents.dtype)
            weight = self._time_view(self.hold, latents).expand_as(latents)
            latents = torch.lerp(latents, target, weight)
            self.pulls.append((self.clip, weight))
        target = noised(self.reference.to(latents.device), self.noise.to(latents.device, latents.dtype), next_level)
        target = target.to(latents.dtype)  # one frame
        if self.background_freeze > 0:
            still = 1.0 - (self.motion_mask if self.motion_mask is not None else torch.zeros_like(target))
            weight = (self.background_freeze * still).to(latents.device, latents.dtype).expand_as(latents)
            # lerp is exact at the ends (weight 1 gives the target bit-for-bit).
            latents = torch.lerp(latents, target.expand_as(latents), weight)
            self.pulls.append((self.reference, weight))
        if self.anchor_strength > 0:
            latents = latents.clone()
            first = latents.narrow(self.time_dim, 0, 1)
            first.copy_(torch.lerp(first, target.expand_as(first), self.anchor_strength))
            weight = torch.zeros_like(latents)
            weight.narrow(self.time_dim, 0, 1).fill_(self.anchor_strength)
            self.pulls.append((self.reference, weight))
        return latents

    def pull_history(self, history: torch.Tensor) -> torch.Tensor:
        """A multistep solver's stored clean estimate, pulled toward the targets with the latest pulls' weights:
        the solver's next update then starts from latents and a history that agree."""
        for target, weight in self.pulls:
            target = target.to(history.device, history.dtype).expand_as(history)
            history = torch.lerp(history, target, weight.to(history.device, history.dtype).expand_as(history))
        return history

    def _time_view(self, weights: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        view = [1] * like.dim()
        view[self.time_dim] = weights.shape[0]
        return weights.to(like.device, like.dtype).view(view)


def mask_to_latent_grid(mask, height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Downsample a pixel mask ``(H, W)`` in [0, 1] to ``(1, 1, 1, height, width)`` by area (keeps feathering)."""
    m = torch.as_tensor(mask, dtype=torch.float32)
    if m.dim() != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {tuple(m.shape)}")
    m = F.interpolate(m[None, None], size=(height, width), mode="area")[0, 0]
    return m.clamp(0, 1).to(device=device, dtype=dtype)[None, None, None]
