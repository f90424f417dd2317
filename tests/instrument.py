"""An exact toy model: the posterior-mean denoiser of a known Gaussian-process video prior.

This is the instrument every change to the sampler is judged with. Each latent pixel is an independent stationary
Gaussian process over time with a squared-exponential covariance ``K_ij = exp(-(i-j)^2 / (2 l^2)) + jitter``. The
"model" sees only the clip it is handed (non-cyclic ``K`` of that many frames), as a real model that has only ever
seen clips of the trained length: it has no idea the clip is a cycle, so any seam it leaves is the sampler's doing.

Derivation. Every scheduler writes ``x_t = a x0 + s eps``; with ``x0 ~ N(0, K)`` along time,
``E[x0 | x_t] = a K (a^2 K + s^2 I)^-1 x_t`` (Gaussian conditioning). CogVideoX (v-prediction): ``a = sqrt(alpha_bar)``,
``s = sqrt(1 - alpha_bar)`` at ``scheduler.alphas_cumprod[timestep]``; the scheduler recovers ``x0_hat = a x_t - s v``,
so the prediction that implies the posterior mean is ``v = (a x_t - x0_hat) / s``. Wan (flow matching):
``a = 1 - sigma``, ``s = sigma`` at the step's ``scheduler.sigmas`` entry; ``x0_hat = x_t - sigma v``, so
``v = (x_t - x0_hat) / sigma``. The text is ignored, so classifier-free guidance changes nothing.

Usage::

    instrument = GaussianProcessDenoiser(pipe.scheduler)
    pipe.transformer.forward = instrument      # instance attribute: the engine wraps and restores it
    ...
    del pipe.transformer.forward               # back to the real transformer

:func:`measure` runs one generation and returns the seam and interior ratios of the final latents.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

# 3 latents reproduces the reference figures of issue 5: the reference loop's largest interior step is 1.325x the
# mean step (1.33 there) and 3 equal-weight offsets over the last 20 % give 1.096 (1.10 there). Plain sampling's wrap
# step is then 1 / sqrt(1 - exp(-1 / (2 l^2))) = 4.3x a step (2.9x at l = 2, where the loop's interior seam is 1.18).
LENGTH_SCALE = 3.0
JITTER = 1e-4
# 4 channels x 32 x 48 latents = 6144 independent values per frame: the steps' means are then precise enough that an
# ordinary (non-looping) exact sample has an interior ratio of ~1.025 (the largest of 12-38 noisy step means), the
# floor every loop is compared with. A quarter of the pixels raises that floor to ~1.04-1.05.
HEIGHT, WIDTH = 256, 384


def prior_covariance(num_frames: int, length_scale: float = LENGTH_SCALE, jitter: float = JITTER) -> torch.Tensor:
    """``(T, T)`` float64 squared-exponential covariance over ``num_frames`` consecutive (non-cyclic) frames."""
    t = torch.arange(num_frames, dtype=torch.float64)
    k = torch.exp(-((t[:, None] - t[None, :]) ** 2) / (2.0 * length_scale**2))
    return k + jitter * torch.eye(num_frames, dtype=torch.float64)


def posterior_matrix(num_frames: int, a: float, s: float, length_scale: float = LENGTH_SCALE,
                     jitter: float = JITTER) -> torch.Tensor:
    """``M`` with ``E[x0 | x_t] = M x_t`` along time for ``x_t = a x0 + s eps``: ``a K (a^2 K + s^2 I)^-1``."""
    k = prior_covariance(num_frames, length_scale, jitter)
    system = a * a * k + s * s * torch.eye(num_frames, dtype=torch.float64)
    # K and the system matrix are symmetric, so K S^-1 = (S^-1 K)^T: one solve, no explicit inverse.
    return a * torch.linalg.solve(system, k).T


def posterior_mean_matrix(num_frames: int, alpha_bar: float, length_scale: float = LENGTH_SCALE,
                          jitter: float = JITTER) -> torch.Tensor:
    """``M`` with ``E[x0 | x_t] = M x_t`` along time: ``sqrt(a) K (a K + (1-a) I)^-1`` (float64, ``(T, T)``)."""
    a = float(alpha_bar)
    return posterior_matrix(num_frames, math.sqrt(a), math.sqrt(max(1.0 - a, 0.0)), length_scale, jitter)


class GaussianProcessDenoiser:
    """A stand-in for a video transformer's ``forward``: the exact prediction of the GP prior.

    The prior acts along time only (axis ``time_dim``: 1 for CogVideoX's ``(B, T, C, H, W)``, 2 for Wan's
    ``(B, C, T, H, W)``), every (channel, pixel) independently. ``flow`` selects flow matching (Wan) over DDPM-style
    v-prediction (CogVideoX). ``calls`` counts invocations and ``frames_seen`` the total number of latent frames handed
    in (a measure of compute that does not depend on how the engine splits the cycle).
    """

    def __init__(self, scheduler, length_scale: float = LENGTH_SCALE, jitter: float = JITTER,
                 out_channels: Optional[int] = None, time_dim: int = 1, flow: bool = False) -> None:
        self.scheduler = scheduler
        self.flow = flow
        self.alphas_cumprod = None if flow else scheduler.alphas_cumprod.double().cpu()
        self.out_channels = out_channels
        self.time_dim = time_dim
        self.channel_dim = 2 if time_dim == 1 else 1
        self.length_scale = length_scale
        self.jitter = jitter
        self.calls = 0
        self.frames_seen = 0
        self._cache: dict[tuple[int, float], tuple[torch.Tensor, float, float]] = {}

    def _level(self, timestep: float) -> tuple[float, float]:
        if self.flow:
            # The step's sigma (timesteps are truncated sigma * 1000 in UniPC, so look the step up).
            index = int((self.scheduler.timesteps.double() - timestep).abs().argmin())
            sigma = float(self.scheduler.sigmas[index])
            return 1.0 - sigma, sigma
        a = float(self.alphas_cumprod[int(timestep)])
        return math.sqrt(a), math.sqrt(max(1.0 - a, 1e-12))

    def _operator(self, num_frames: int, timestep: float) -> tuple[torch.Tensor, float, float]:
        key = (num_frames, float(timestep))
        if key not in self._cache:
            a, s = self._level(timestep)
            self._cache[key] = (posterior_matrix(num_frames, a, s, self.length_scale, self.jitter), a, max(s, 1e-12))
        return self._cache[key]

    def x0_hat(self, hidden_states: torch.Tensor, timestep: float) -> torch.Tensor:
        """Posterior mean ``E[x0 | x_t]`` of ``hidden_states`` at ``timestep`` (time on ``time_dim``)."""
        m, _, _ = self._operator(hidden_states.shape[self.time_dim], timestep)
        moved = hidden_states.double().movedim(self.time_dim, -1)  # (..., T)
        return torch.einsum("st,...t->...s", m, moved).movedim(-1, self.time_dim)

    def __call__(self, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 timestep=None, return_dict: bool = True, **unused):
        self.calls += 1
        self.frames_seen += int(hidden_states.shape[self.time_dim])
        steps = torch.as_tensor(timestep).flatten()
        t = float(steps[0])
        if steps.numel() > 1 and not bool((steps == steps[0]).all()):
            raise ValueError("the instrument expects one timestep for the whole batch")
        # I2V models get image conditioning concatenated on C after the noisy latents; the prediction has the noisy
        # latents' channel count (the conditioning is ignored: the prior knows nothing of the image).
        x_t = hidden_states.double()
        if self.out_channels:
            x_t = x_t.narrow(self.channel_dim, 0, self.out_channels)
        _, a, s = self._operator(hidden_states.shape[self.time_dim], t)
        x0 = self.x0_hat(x_t, t)
        v = ((x_t - x0) / s) if self.flow else ((a * x_t - x0) / s)
        v = v.to(hidden_states.dtype)
        if return_dict:
            from diffusers.models.modeling_outputs import Transformer2DModelOutput

            return Transformer2DModelOutput(sample=v)
        return (v,)


class _LiveScheduler:
    """Whatever scheduler the pipeline holds at call time (the engine swaps in the plan's for one call)."""

    def __init__(self, pipe) -> None:
        self._pipe = pipe

    def __getattr__(self, name: str):
        return getattr(self._pipe.scheduler, name)


@contextmanager
def installed(pipe, length_scale: float = LENGTH_SCALE) -> Iterator[GaussianProcessDenoiser]:
    """Replace ``pipe.transformer.forward`` by a fresh instrument for the block, then restore the real one."""
    from loopui.engine.families import family_for

    family = family_for(pipe)
    instrument = GaussianProcessDenoiser(_LiveScheduler(pipe), length_scale=length_scale,
                                         out_channels=int(pipe.transformer.config.out_channels),
                                         time_dim=family.time_dim, flow=family.flow_matching)
    had = "forward" in pipe.transformer.__dict__
    previous = pipe.transformer.__dict__.get("forward")
    pipe.transformer.forward = instrument
    try:
        yield instrument
    finally:
        if had:
            pipe.transformer.forward = previous
        else:
            del pipe.transformer.forward


@dataclass(frozen=True)
class Measurement:
    """Seam statistics of one instrument run (final latents) and its cost."""

    seam_ratio: float
    interior_ratio: float
    worst_step: tuple[int, int]
    model_calls: int
    frames_seen: int
    seconds: float
    latents: Optional[torch.Tensor] = None  # (T, ...) final latents, time first
    shift_skip: int = 0

    def lag_correlation(self, lag: Optional[int] = None) -> float:
        """See :func:`lag_correlation` (at the shift skip by default)."""
        return lag_correlation(self.latents, self.shift_skip if lag is None else lag)

    def relative_error(self, other: "Measurement") -> float:
        """See :func:`relative_error`."""
        return relative_error(self.latents, other.latents)


def lag_correlation(latents: torch.Tensor, lag: int) -> float:
    """Pearson correlation of a loop ``(T, ...)`` with itself rotated by ``lag`` frames around the cycle.

    A cache that reuses a prediction made in another rotation's frame order leaves a copy of the loop shifted by the
    shift skip on top of it (ghosting, a double exposure); an exact sample of the prior is uncorrelated at that lag
    (``exp(-lag^2 / (2 l^2))``: 0.004 at lag 10, l = 3). Seam ratios do not see it.
    """
    x = latents.double().flatten(1)
    y = torch.roll(x, shifts=-int(lag), dims=0)
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / (x.norm() * y.norm()))


def relative_error(latents: torch.Tensor, reference: torch.Tensor) -> float:
    """``||latents - reference|| / ||reference||`` (how far a cached run lands from the uncached one)."""
    return float((latents.double() - reference.double()).norm() / reference.double().norm())


def measure(pipe, num_latents: int = 13, seed: int = 0, shift_skip: Optional[int] = None, seam_polish: str = "off",
            window_mode: str = "full", num_inference_steps: int = 50, length_scale: float = LENGTH_SCALE,
            height: int = HEIGHT, width: int = WIDTH, polish=None, scheduler: Optional[str] = None,
            sigmas=None, step_cache: str = "off") -> Measurement:
    """One loop generation on the instrument; ``shift_skip=0`` is plain sampling.

    ``polish`` (a ``SeamPolish``) overrides the ``seam_polish`` preset for sweeps; ``scheduler``, ``sigmas`` and
    ``step_cache`` are the request's knobs.
    """
    from loopui.engine import LoopRequest, generate_loop
    from loopui.engine import polish as polish_module
    from loopui.media import loop_metrics

    request = LoopRequest(prompt="gaussian process", num_frames=4 * (num_latents - 1) + 1, height=height,
                          width=width, num_inference_steps=num_inference_steps, guidance_scale=1.0, seed=seed,
                          shift_skip=shift_skip, window_mode=window_mode, seam_polish=seam_polish,
                          frame_invariant_decoding=False, scheduler=scheduler, sigmas=sigmas, step_cache=step_cache)
    with installed(pipe, length_scale) as instrument, _preset(polish_module, seam_polish, polish):
        start = time.perf_counter()
        result = generate_loop(pipe, request, output_type="latent")
        seconds = time.perf_counter() - start
    from loopui.engine.families import family_for

    latents = family_for(pipe).time_first(result.latents)
    metrics = loop_metrics(latents)
    return Measurement(seam_ratio=float(metrics.seam_ratio), interior_ratio=float(metrics.interior_ratio),
                       worst_step=tuple(metrics.worst_interior_step), model_calls=int(result.settings["model_calls"]),
                       frames_seen=instrument.frames_seen, seconds=seconds, latents=latents,
                       shift_skip=int(result.plan.shift_skip))


@contextmanager
def _preset(polish_module, level: str, polish) -> Iterator[None]:
    """Temporarily point ``level`` at a custom ``SeamPolish`` (sweeps try settings that are no preset)."""
    if polish is None:
        yield
        return
    presets = polish_module.SEAM_POLISH_PRESETS
    previous = presets[level]
    presets[level] = polish
    try:
        yield
    finally:
        presets[level] = previous


def seed_means(pipe, trained_latents: int, seeds=(0, 1, 2)):
    """``run(num_latents, level, shift_skip=None)`` -> (mean seam, mean interior, model calls, worst steps) over
    ``seeds``; cycles longer than ``trained_latents`` run in window mode. Cached: tests share runs."""
    import functools

    @functools.lru_cache(maxsize=None)
    def run(num_latents: int, level: str, shift_skip=None):
        mode = "full" if num_latents <= trained_latents else "window"
        ms = [measure(pipe, num_latents=num_latents, seed=s, shift_skip=shift_skip, seam_polish=level,
                      window_mode=mode) for s in seeds]
        return (sum(m.seam_ratio for m in ms) / len(ms), sum(m.interior_ratio for m in ms) / len(ms),
                ms[0].model_calls, [m.worst_step for m in ms])

    return run
