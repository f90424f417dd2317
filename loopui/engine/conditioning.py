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
- ``loop_region`` r (clips): the ``round(r L)`` latents nearest the wrap may change, the other ``L - round(r L)`` are
  held exactly to the clip's own latents (replaced by them, noised per frame, after every step). The free latents
  are released from the wrap outwards (see :func:`wrap_hold`), so the change fades toward the held part.

A pull of weight w keeps the step's noise level: clean parts are interpolated and the noises combined as independent
unit noises (:func:`loopui.engine.noise.pulled`), where a lerp of the noised latents would leave
``sqrt((1-w)^2 + w^2)`` of it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F

from .noise import NoiseLevel, noised, prediction_for, pulled

logger = logging.getLogger(__name__)

# How a clip's free latents are released along the schedule (hold fraction (m / n) ** p, m-th of n from the wrap).
# Measured on the instrument (bench/clip_region.py, 13 latents, loop_region 0.5, init 0.7 / 1.0): p = 1 leaves the
# largest step at the join with the held part (1.20 / 1.34 x the mean step, the wrap 1.05 / 0.92); p = 0.5 releases
# the latents near the held part later and balances join and wrap (join 1.09 / 1.16, wrap 1.14 / 1.03); p = 0.3 moves
# the worst step to the wrap (1.19 / 1.11).
RELEASE_POWER = 0.5


def wrap_hold(length: int, loop_region: float) -> torch.Tensor:
    """``(L,)`` float32: for how much of the schedule (after the init-strength steps) each of a clip's latents stays
    held to the clip; 1 = to the end (the latent is the clip's), 0 = free from the start.

    ``F = max(1, round(loop_region * L))`` latents (halves round up) around the wrap may change: latents 0, L-1, 1,
    L-2, ... in that order (an odd F gives the start one more). The other ``L - F`` are held exactly. Each side's
    run of ``n`` free latents is released in turn, from the wrap outwards: the ``m``-th from the wrap is held for the
    first ``(m / n) ** RELEASE_POWER`` of the schedule, so the latents at the wrap change most and the change fades
    toward the held part (the transition lies inside the free part).
    """
    if loop_region >= 1.0:
        return torch.zeros(length)
    free = min(length, max(1, math.floor(loop_region * length + 0.5)))
    after, before = (free + 1) // 2, free // 2  # free latents 0..after-1 and L-before..L-1
    hold = torch.ones(length)
    for m in range(after):
        hold[m] = (m / after) ** RELEASE_POWER
    for m in range(before):
        hold[length - 1 - m] = (m / before) ** RELEASE_POWER
    return hold


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


    def release_steps(self) -> torch.Tensor:
        """``(L,)`` the step from which each clip latent is free: ``init_steps + ceil(hold * free steps)``, at the
        latest the last step (a latent that may change gets at least one step), and ``num_steps`` (never) for a
        hold of 1."""
        span = self.num_steps - self.init_steps
        release = (self.init_steps + torch.ceil(self.hold.double() * span - 1e-9)).clamp(max=self.num_steps - 1)
        return torch.where(self.hold >= 1.0, torch.full_like(release, self.num_steps), release)

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

    def after_step(self, step: int, latents: torch.Tensor, next_level: NoiseLevel,
                   clean: torch.Tensor) -> torch.Tensor:
        """Apply init / hold / freeze / anchor pulls to the latents the scheduler just produced (level of step + 1),
        ``clean`` being the step's clean estimate of the cycle: a pull interpolates clean parts and keeps the noise at
        the step's level (:func:`loopui.engine.noise.pulled`)."""
        self.pulls = []
        if step < self.init_steps and self.initial_noise is not None:
            # Snap onto the exact noised start (the oracle prediction got within float error of it).
            return noised(self.start.to(latents.device), self.initial_noise.to(latents.device, latents.dtype),
                          next_level).to(latents.dtype)
        clean = clean.to(latents.device, latents.dtype)
        if self.hold is not None and self.clip is not None and bool(self.hold.any()):
            # Held latents are replaced by the noised clip until their release step (never, for a hold of 1).
            weight = self._time_view((step < self.release_steps()).float(), latents).expand_as(latents)
            latents, clean = pulled(latents, clean, self.clip, self.clip_noise, weight, next_level)
            self.pulls.append((self.clip, weight))
        if self.background_freeze > 0 or self.anchor_strength > 0:
            # Freeze and anchor pull toward the same noised still: one pull, weights composed as two lerps would be
            # (two pulls would mix the target's noise with itself and overshoot the noise level).
            keep = torch.ones_like(latents)
            if self.background_freeze > 0:
                still = 1.0 - (self.motion_mask if self.motion_mask is not None else torch.zeros_like(self.reference))
                keep = keep * (1.0 - self.background_freeze * still.to(latents.device, latents.dtype))
            if self.anchor_strength > 0:
                keep.narrow(self.time_dim, 0, 1).mul_(1.0 - self.anchor_strength)
            weight = 1.0 - keep
            latents, clean = pulled(latents, clean, self.reference, self.noise, weight, next_level)
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
