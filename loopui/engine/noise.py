"""Noise levels and prediction types: one algebra for DDPM-style (CogVideoX) and flow-matching (Wan) schedulers.

Every scheduler loopui drives writes a noisy sample at step ``i`` as ``x_i = a_i * x0 + s_i * noise``:
DDPM-style ``a = sqrt(alpha_bar_t)``, ``s = sqrt(1 - alpha_bar_t)`` at ``t = timesteps[i]``; flow matching
``a = 1 - sigma_i``, ``s = sigma_i``. With that pair, the image controls (noised targets, the init-strength oracle,
the clean estimate that fills an I2V image channel) are the same few lines for every family.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PREDICTION_TYPES = ("v_prediction", "epsilon", "sample", "flow_prediction")


@dataclass(frozen=True)
class NoiseLevel:
    """``x = a * x0 + s * noise`` at one point of the schedule (``a = 1, s = 0`` is the clean end)."""

    a: float
    s: float

    @property
    def clean(self) -> bool:
        return self.s == 0.0


def level_at(scheduler, index: int, flow: bool) -> NoiseLevel:
    """The noise level of step ``index`` of ``scheduler``'s current schedule (``len(timesteps)``: clean)."""
    if index >= len(scheduler.timesteps):
        return NoiseLevel(1.0, 0.0)
    if flow:
        sigma = float(scheduler.sigmas[index])
        return NoiseLevel(1.0 - sigma, sigma)
    t = int(scheduler.timesteps[index])
    alpha_bar = float(scheduler.alphas_cumprod[t])
    return NoiseLevel(alpha_bar ** 0.5, max(1.0 - alpha_bar, 0.0) ** 0.5)


def noised(x0: torch.Tensor, noise: torch.Tensor, level: NoiseLevel) -> torch.Tensor:
    """``a * x0 + s * noise`` (``x0`` broadcast to the noise's shape); exactly ``x0`` at the clean level."""
    x0 = x0.expand_as(noise).to(noise.dtype)
    if level.clean:
        return x0.clone()
    return level.a * x0 + level.s * noise


def prediction_for(x_t: torch.Tensor, x0: torch.Tensor, level: NoiseLevel, prediction_type: str) -> torch.Tensor:
    """The model output whose clean estimate at ``x_t`` is exactly ``x0`` (the init-strength oracle)."""
    x_t, x0 = x_t.float(), x0.float().expand_as(x_t)
    eps = (x_t - level.a * x0) / max(level.s, 1e-12)
    if prediction_type == "v_prediction":
        return level.a * eps - level.s * x0
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "sample":
        return x0.clone()
    if prediction_type == "flow_prediction":
        return eps - x0
    raise ValueError(f"unsupported prediction type {prediction_type!r} (known: {', '.join(PREDICTION_TYPES)})")


def clean_estimate(x_t: torch.Tensor, output: torch.Tensor, level: NoiseLevel,
                   prediction_type: str) -> torch.Tensor:
    """The clean sample a model output implies at ``x_t`` (inverse of :func:`prediction_for`)."""
    x_t, output = x_t.float(), output.float()
    if prediction_type == "v_prediction":
        return level.a * x_t - level.s * output
    if prediction_type == "epsilon":
        return (x_t - level.s * output) / max(level.a, 1e-12)
    if prediction_type == "sample":
        return output.clone()
    if prediction_type == "flow_prediction":
        return x_t - level.s * output
    raise ValueError(f"unsupported prediction type {prediction_type!r} (known: {', '.join(PREDICTION_TYPES)})")


def pulled(latents: torch.Tensor, clean: torch.Tensor, target: torch.Tensor, target_noise: torch.Tensor,
           weight: torch.Tensor, level: NoiseLevel) -> tuple[torch.Tensor, torch.Tensor]:
    """Pull ``latents`` (at ``level``, clean estimate ``clean``) toward ``target`` noised with ``target_noise``, by
    ``weight`` in [0, 1] (broadcast to the latents), keeping the step's noise level. Returns the latents and their
    clean part.

    The clean parts are interpolated and the two noises, the latents' own ``n = (x - a clean) / s`` and the target's
    ``z``, combined as independent unit noises: ``a lerp(clean, target, w) + s ((1-w) n + w z) / sqrt((1-w)^2 + w^2)``.
    A plain lerp of the noised latents would scale the noise by ``sqrt((1-w)^2 + w^2)`` (0.71 at w = 0.5). Exactly
    the latents at w = 0, exactly the noised target at w = 1, a plain lerp at the clean level.
    """
    weight = weight.to(latents.device, latents.dtype).expand_as(latents)
    target = target.to(latents.device, latents.dtype).expand_as(latents)
    clean = clean.to(latents.device, latents.dtype).expand_as(latents)
    new_clean = torch.lerp(clean, target, weight)
    if level.clean:
        return torch.lerp(latents, target, weight), new_clean
    noise = (latents - level.a * clean) / level.s
    z = target_noise.to(latents.device, latents.dtype).expand_as(latents)
    norm = torch.sqrt((1.0 - weight) ** 2 + weight ** 2)
    mixed = level.a * new_clean + level.s * ((1.0 - weight) * noise + weight * z) / norm
    held = level.a * target + level.s * z
    out = torch.where(weight >= 1.0, held, torch.where(weight <= 0.0, latents, mixed))
    return out, new_clean
