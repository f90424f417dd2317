"""Mobius latent shift: the cycle seen by the model rotates by ``i * k mod L`` at step i.

The shift is installed around the transformer call (the pipeline's own ``__call__`` is untouched): the model receives
the cycle rotated left by the step's offset, and its prediction is rotated back before the scheduler step, so the
scheduler always works in the cycle's own order.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

logger = logging.getLogger(__name__)


# Below this noise fraction a prediction is nearly the identity (Euler's last call on a flow schedule sits at
# sigma ~ 0.009): the model's view of the cycle cannot leave a seam there, so polishing it buys nothing.
INFORMATIVE_SIGMA = 0.02


def noise_fraction(level) -> float:
    """The flow-matching sigma with the same signal-to-noise ratio as ``x = a x0 + s noise``: ``s / (a + s)``.

    1 is pure noise, 0 clean; for a flow-matching scheduler (``a = 1 - sigma``, ``s = sigma``) it is sigma itself,
    so one polish rule serves DDPM-style (CogVideoX) and flow-matching (Wan) schedules alike."""
    a, s = float(level.a), float(level.s)
    return s / (a + s) if a + s > 0 else 1.0


@dataclass(frozen=True)
class SeamPolish:
    """Remove the seam the last steps leave where the model saw the cycle cut.

    Polished steps combine ``num_offsets`` evenly spaced rotations of the cycle instead of one. With ``feather > 0``
    each clip the model saw (the rotated cycle, or each wrapping window of it) counts with a weight that fades
    towards the clip's two ends, ``(distance to the nearer end / half the clip) ** feather``: a frame next to one
    rotation's cut is taken from the rotations that saw it in the middle of their clip, where the model had context
    on both sides. ``feather = 0`` is a plain mean. Measured on an exact toy denoiser (docs/seam_polish.md).

    Which steps are polished is chosen by noise level when the schedule's levels are known (``polished_steps``):
    every informative step (noise fraction at least ``INFORMATIVE_SIGMA``) that is no noisier than ``max_sigma``
    and lowers the noise fraction by at least ``min_drop`` -- the big steps of a few-step schedule, where one cut
    is not healed by the steps after it -- plus the last ``fraction`` of the informative steps (at least the last
    one, where the seam of a long schedule forms). Without levels, the last ``fraction`` of all steps.

    ``spread=True`` uses one rotation per step (the evenly spaced set is walked across consecutive steps) instead of
    all of them at every step: no extra compute, but it leaves the final step's cut in place (it does not help).
    """

    num_offsets: int = 1
    fraction: float = 0.0
    spread: bool = False
    feather: float = 0.0
    max_sigma: float = 1.0
    min_drop: float = math.inf

    @property
    def active(self) -> bool:
        """Whether this polish changes anything (more than one rotation, or feathered windows)."""
        return self.fraction > 0.0 and (self.num_offsets > 1 or self.feather > 0.0)

    def num_polish_steps(self, num_steps: int) -> int:
        """How many final steps are polished: ``round(fraction * num_steps)``, at least 1 (0 when inactive)."""
        if not self.active or num_steps <= 0:
            return 0
        return min(num_steps, max(1, round(self.fraction * num_steps)))

    def polished_steps(self, num_steps: int, sigmas: Optional[Sequence[float]] = None) -> frozenset[int]:
        """The steps this polish rewrites. ``sigmas``: the noise fraction (:func:`noise_fraction`) before each step
        and after the last one (``num_steps + 1`` values); None = unknown, the last ``fraction`` of the steps."""
        if not self.active or num_steps <= 0:
            return frozenset()
        if sigmas is None or len(sigmas) < num_steps + 1:
            return frozenset(range(num_steps - self.num_polish_steps(num_steps), num_steps))
        informative = [i for i in range(num_steps) if sigmas[i] >= INFORMATIVE_SIGMA]
        if not informative:
            return frozenset({num_steps - 1})
        final = informative[-self.num_polish_steps(len(informative)):]
        big = [i for i in informative if sigmas[i] <= self.max_sigma and sigmas[i] - sigmas[i + 1] >= self.min_drop]
        return frozenset(final + big)


# The loop cache weighs each clip's frames by the same feathered taper as seam polish's blend (polish.FEATHER).
CACHE_FEATHER = 2.0


def edge_taper(size: int, power: float, device=None) -> torch.Tensor:
    """``(size,)`` float32 weights ``(d / d_max) ** power`` with ``d`` the distance of a frame from the clip's nearer
    end (``0.5`` for the first and last frame): 1 in the middle, small but positive at the ends."""
    position = torch.arange(size, dtype=torch.float64, device=device)
    distance = torch.minimum(position + 0.5, size - 0.5 - position)
    return ((distance / distance.max()) ** power).float()


def frame_weights(clips: Sequence[torch.Tensor], length: int, power: float = CACHE_FEATHER) -> torch.Tensor:
    """``(L,)`` how much each cycle frame was seen away from a clip's ends (summed edge tapers of ``clips``): how far
    the loop cache trusts the prediction it keeps of each frame."""
    weights = torch.zeros(length, dtype=torch.float32)
    for clip in clips:
        weights.index_add_(0, clip.cpu(), edge_taper(len(clip), power))
    return weights


@dataclass
class ShiftSchedule:
    """Which rotations of the cycle the model sees at each denoising step.

    ``noise_levels`` (optional) returns the noise fraction before each step and after the last (``num_steps + 1``
    values); it is read once, at the first question about polishing (a pipeline sets its timesteps inside its call),
    so the polished steps follow the noise schedule rather than a fraction of it.
    """

    length: int
    skip: int
    num_steps: int
    start: float = 0.0
    end: float = 1.0
    polish: SeamPolish = field(default_factory=SeamPolish)
    noise_levels: Optional[Callable[[], Sequence[float]]] = None
    step_cache: bool = False  # the loop cache answers some steps without the model (loopui.engine.stepcache)
    _polished: Optional[frozenset] = field(default=None, init=False, repr=False)
    _skipped: Optional[frozenset] = field(default=None, init=False, repr=False)
    _sigmas: Optional[list] = field(default=None, init=False, repr=False)

    def shifting(self, step: int) -> bool:
        """Whether ``step`` lies in the shift window ``[start, end)`` (fractions of the schedule)."""
        return self.start * self.num_steps <= step < self.end * self.num_steps

    def offset(self, step: int) -> int:
        """``o_i = (i * k) mod L`` inside the shift window, 0 outside it. With the loop cache ``i`` counts computed
        steps only, so consecutive model calls see the cycle cut a shift skip apart."""
        if self.skip == 0 or self.length <= 1 or not self.shifting(step):
            return 0
        if self.step_cache:
            step -= sum(1 for s in self.skipped_steps() if s < step)
        return (step * self.skip) % self.length

    def sigmas(self) -> Optional[list]:
        """The noise fractions of the schedule (``num_steps + 1``), read once; None without ``noise_levels``."""
        if self._sigmas is None and self.noise_levels is not None:
            self._sigmas = [float(x) for x in self.noise_levels()]
        return self._sigmas

    def polished_steps(self) -> frozenset[int]:
        """Every step seam polish rewrites (none for plain sampling)."""
        if self.skip == 0 or self.length <= 1:
            return frozenset()
        if self._polished is None:
            self._polished = self.polish.polished_steps(self.num_steps, self.sigmas())
        return self._polished

    def skipped_steps(self) -> frozenset[int]:
        """The steps the loop cache answers without calling the model (none without it or without noise levels)."""
        if self._skipped is None:
            from .stepcache import cache_skips

            sigmas = self.sigmas()
            self._skipped = frozenset() if not self.step_cache or sigmas is None else cache_skips(
                sigmas, self.num_steps, keep=self.polished_steps())
        return self._skipped

    def polishing(self, step: int) -> bool:
        """Whether ``step`` is one of the steps that seam polish rewrites (never for plain sampling)."""
        return step in self.polished_steps()

    def offsets(self, step: int) -> list[int]:
        """Every rotation whose predictions are combined at ``step`` (one, unless seam polish is active)."""
        base = self.offset(step)
        if not self.polishing(step):
            return [base]
        m = max(1, min(self.polish.num_offsets, self.length))
        spaced = [(base + round(j * self.length / m)) % self.length for j in range(m)]
        if self.polish.spread:
            return [spaced[sorted(self.polished_steps()).index(step) % m]]
        return list(dict.fromkeys(spaced))

    def feather(self, step: int) -> float:
        """Edge-taper exponent for the clips the model sees at ``step`` (0: combine them with equal weights)."""
        return self.polish.feather if self.polishing(step) else 0.0


def window_starts(length: int, window: int, overlap: Optional[int] = None) -> list[int]:
    """Start positions of wrapping windows of ``window`` latents that cover a cycle of ``length``.

    Starts are evenly spaced around the cycle with stride at most ``window - overlap`` (default overlap: half a
    window), so every latent is covered and neighbouring windows overlap. A cycle no longer than the window is one
    window at 0.
    """
    if window <= 0:
        raise ValueError(f"window must be positive, got {window}")
    if length <= window:
        return [0]
    overlap = window // 2 if overlap is None else overlap
    if not 0 <= overlap < window:
        raise ValueError(f"overlap must be in [0, {window}), got {overlap}")
    stride = window - overlap
    count = math.ceil(length / stride)
    return sorted({round(j * length / count) % length for j in range(count)})


def window_indices(length: int, window: int, overlap: Optional[int] = None) -> list[torch.Tensor]:
    """Latent indices (wrapping around the end) of each window."""
    span = min(window, length)
    return [(start + torch.arange(span)) % length for start in window_starts(length, window, overlap)]


@dataclass
class StepState:
    """Mutable state shared by the transformer wrapper(s) and the step callback (the step advances after each
    scheduler step, as in the reference algorithm)."""

    step: int = 0
    calls: int = 0
    clean: Optional[torch.Tensor] = None  # the latest clean estimate of the cycle (family layout, float32)


IMAGE_CHANNEL_POLICIES = ("estimate", "image", "roll")


@dataclass
class ImageChannel:
    """How an image-to-video model's conditioning channels are filled in each clip the model sees.

    The pipeline concatenates ``[noisy latents | conditioning]`` on the channel axis, the conditioning holding the
    reference image at clip position 0 (and a mask, for Wan). The model was trained with the image at position 0
    only. Policies:

    - ``estimate`` (default): the noisy latents rotate, the conditioning stays in clip coordinates; position 0 carries
      the reference image when the clip starts at the anchored latent (cycle latent 0), otherwise the loop's current
      clean estimate of whichever latent starts the clip. Every call looks like an I2V call of the model's training.
    - ``image``: the conditioning stays in clip coordinates with the reference image at position 0 whatever latent
      starts the clip (every clip is pulled towards the image).
    - ``roll``: the conditioning rotates with the cycle, the image riding on its latent (out of distribution whenever
      that latent is not first in the clip).
    """

    policy: str
    noisy_channels: int  # channels of the noisy latents (the conditioning follows on the channel axis)
    latent_start: int  # where the image latent sits inside the conditioning channels
    latent_count: int

    def __post_init__(self) -> None:
        if self.policy not in IMAGE_CHANNEL_POLICIES:
            raise ValueError(f"image_channel must be one of {', '.join(IMAGE_CHANNEL_POLICIES)}; got {self.policy!r}")


class CycleDenoiser:
    """Wraps a transformer ``forward``: the model sees clips of the cycle (rotated, and in window mode wrapping
    windows of the trained length); the predictions go back to their cycle positions.

    A clip is a list of cycle frame indices in the order the model sees them: a rotation by o is
    ``(o + arange(L)) % L``, a window is a run of it. The family answers everything layout-specific: the time axis,
    the per-frame keyword arguments of a clip (rotary rows, per-token timesteps) and where I2V conditioning sits.
    CFG's halves (stacked on B, or two calls per step) see the same clips.
    """

    def __init__(
        self,
        forward: Callable,
        schedule: ShiftSchedule,
        state: StepState,
        time_dim: int = 1,
        window: Optional[int] = None,
        window_overlap: Optional[int] = None,
        override: Optional[Callable[[int, torch.Tensor, torch.Tensor], Optional[torch.Tensor]]] = None,
        clip_kwargs: Optional[Callable[[dict, torch.Tensor, int], dict]] = None,
        image_channel: Optional[ImageChannel] = None,
        channel_dim: int = 2,
        observe: Optional[Callable[[int, torch.Tensor, Optional[torch.Tensor]], None]] = None,
        cache: Optional[Any] = None,
    ) -> None:
        self.forward = forward
        self.schedule = schedule
        self.state = state
        self.time_dim = time_dim
        self.channel_dim = channel_dim
        self.window = window
        self.window_overlap = window_overlap
        self.override = override
        self.clip_kwargs = clip_kwargs or (lambda kwargs, frames, length: kwargs)
        self.image_channel = image_channel
        self.observe = observe
        self.cache = cache  # a loopui.engine.stepcache.LoopStepCache, or None
        self.model_calls = 0
        self._branch_step, self._branch = -1, 0

    def __call__(self, *args, **kwargs):
        if args:
            raise TypeError("CycleDenoiser expects keyword arguments, as diffusers pipelines pass them")
        hidden_states: torch.Tensor = kwargs.pop("hidden_states")
        timestep = kwargs.get("timestep")
        return_dict = kwargs.pop("return_dict", True)
        step = self.state.step
        self.state.calls += 1

        noisy, condition = self._split(hidden_states)
        if self.observe is not None:
            self.observe(step, noisy, condition)
        # Guidance branches are counted per step (Wan calls once per branch); polish rotations happen inside one call.
        self._branch = self._branch + 1 if step == self._branch_step else 0
        self._branch_step = step
        prediction = self.override(step, noisy, timestep) if self.override is not None else None
        if prediction is None and self.cache is not None and step in self.schedule.skipped_steps() \
                and self.cache.can_reuse(self._branch):
            prediction = self.cache.reuse(self._branch, step, noisy)
        if prediction is None:
            prediction = self._predict(noisy, condition, kwargs, step)
            if self.cache is not None:
                length = noisy.shape[self.time_dim]
                weights = frame_weights(self.clips(step, length), length)
                self.cache.store(self._branch, step, noisy, prediction, weights)

        if return_dict:
            from diffusers.models.modeling_outputs import Transformer2DModelOutput

            return Transformer2DModelOutput(sample=prediction)
        return (prediction,)

    # -- clips ----------------------------------------------------------------------------------------------------
    def clips(self, step: int, length: int) -> list[torch.Tensor]:
        """The cycle frame indices of every clip the model sees at ``step``, each in the order the model sees it."""
        clips = []
        for offset in self.schedule.offsets(step):
            rotated = (offset + torch.arange(length)) % length
            if self.window is None or length <= self.window:
                clips.append(rotated)
            else:
                clips.extend(rotated[idx] for idx in window_indices(length, self.window, self.window_overlap))
        return clips

    def _predict(self, noisy: torch.Tensor, condition: Optional[torch.Tensor], kwargs: dict,
                 step: int) -> torch.Tensor:
        length = noisy.shape[self.time_dim]
        clips = self.clips(step, length)
        feather = self.schedule.feather(step)
        device = noisy.device
        if len(clips) == 1 and not feather:
            out = self._call_clip(noisy, condition, clips[0], kwargs, length)
            if torch.equal(clips[0], torch.arange(length)):
                return out
            frames = clips[0].to(device)
            # Rotate back: the prediction for the clip's j-th frame belongs to cycle frame frames[j].
            return torch.empty_like(out).index_copy_(self.time_dim, frames, out)
        total, counts = None, torch.zeros(length, dtype=torch.float32, device=device)
        for clip in clips:
            out = self._call_clip(noisy, condition, clip, kwargs, length)
            frames = clip.to(device)
            weight = edge_taper(len(frames), feather, out.device) if feather else torch.ones(len(frames), device=device)
            if total is None:
                shape = list(out.shape)
                shape[self.time_dim] = length
                total = torch.zeros(shape, dtype=torch.float32, device=out.device)
            total.index_add_(self.time_dim, frames, out.float() * self._time_view(weight, out.dim()))
            counts.index_add_(0, frames, weight)
        return (total / self._time_view(counts, total.dim())).to(out.dtype)

    def _call_clip(self, noisy: torch.Tensor, condition: Optional[torch.Tensor], clip_frames: torch.Tensor,
                   kwargs: dict, length: int) -> torch.Tensor:
        """One model call on the clip of cycle frames ``clip_frames`` (a CPU index tensor)."""
        frames = clip_frames.to(noisy.device)
        identity = torch.equal(clip_frames, torch.arange(length))
        clip = noisy if identity else noisy.index_select(self.time_dim, frames)
        if condition is not None:
            clip = torch.cat([clip, self._clip_condition(condition, clip_frames, length)], dim=self.channel_dim)
        return self._call_model(clip, self.clip_kwargs(kwargs, frames, length))

    # -- I2V conditioning -----------------------------------------------------------------------------------------
    def _split(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if self.image_channel is None:
            return hidden_states, None
        n = self.image_channel.noisy_channels
        total = hidden_states.shape[self.channel_dim]
        return hidden_states.narrow(self.channel_dim, 0, n), hidden_states.narrow(self.channel_dim, n, total - n)

    def _clip_condition(self, condition: torch.Tensor, frames: torch.Tensor, length: int) -> torch.Tensor:
        policy = self.image_channel.policy
        if policy == "roll":
            return condition.index_select(self.time_dim, frames.to(condition.device))
        clip = condition.narrow(self.time_dim, 0, len(frames))  # clip coordinates: the image at position 0
        first = int(frames[0])
        if policy == "image" or first == 0 or self.state.clean is None:
            return clip
        clip = clip.clone()
        estimate = self.state.clean.narrow(self.time_dim, first, 1).to(clip.device, clip.dtype)
        target = clip.narrow(self.channel_dim, self.image_channel.latent_start, self.image_channel.latent_count)
        target = target.narrow(self.time_dim, 0, 1)
        target.copy_(estimate.expand_as(target))
        return clip

    # -- helpers --------------------------------------------------------------------------------------------------
    def _call_model(self, hidden_states: torch.Tensor, kwargs: dict) -> torch.Tensor:
        self.model_calls += 1
        out = self.forward(hidden_states=hidden_states, return_dict=False, **kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out.sample

    def _time_view(self, weight: torch.Tensor, ndim: int) -> torch.Tensor:
        view = [1] * ndim
        view[self.time_dim] = weight.shape[0]
        return weight.view(view)
