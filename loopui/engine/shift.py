"""Mobius latent shift: the cycle seen by the model rotates by ``i * k mod L`` at step i.

The shift is installed around the transformer call (the pipeline's own ``__call__`` is untouched): the model receives
the cycle rotated left by the step's offset, and its prediction is rotated back before the scheduler step, so the
scheduler always works in the cycle's own order.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SeamPolish:
    """Remove the seam the last steps leave where the model saw the cycle cut.

    During the last ``fraction`` of the steps (at least the final step) the prediction combines ``num_offsets``
    evenly spaced rotations of the cycle instead of one. With ``feather > 0`` each clip the model saw (the rotated
    cycle, or each wrapping window of it) counts with a weight that fades towards the clip's two ends,
    ``(distance to the nearer end / half the clip) ** feather``: a frame next to one rotation's cut is taken from the
    rotations that saw it in the middle of their clip, where the model had context on both sides. ``feather = 0``
    is a plain mean. Measured on an exact toy denoiser (docs/seam_polish.md): the seam is made at the final step, so
    feathering two rotations there removes it; equal weights need many more rotations for less.

    ``spread=True`` uses one rotation per step (the evenly spaced set is walked across consecutive steps) instead of
    all of them at every step: no extra compute, but it leaves the final step's cut in place (it does not help).
    """

    num_offsets: int = 1
    fraction: float = 0.0
    spread: bool = False
    feather: float = 0.0

    @property
    def active(self) -> bool:
        """Whether this polish changes anything (more than one rotation, or feathered windows)."""
        return self.fraction > 0.0 and (self.num_offsets > 1 or self.feather > 0.0)

    def num_polish_steps(self, num_steps: int) -> int:
        """How many final steps are polished: ``round(fraction * num_steps)``, at least 1 (0 when inactive)."""
        if not self.active or num_steps <= 0:
            return 0
        return min(num_steps, max(1, round(self.fraction * num_steps)))


def edge_taper(size: int, power: float, device=None) -> torch.Tensor:
    """``(size,)`` float32 weights ``(d / d_max) ** power`` with ``d`` the distance of a frame from the clip's nearer
    end (``0.5`` for the first and last frame): 1 in the middle, small but positive at the ends."""
    position = torch.arange(size, dtype=torch.float64, device=device)
    distance = torch.minimum(position + 0.5, size - 0.5 - position)
    return ((distance / distance.max()) ** power).float()


@dataclass
class ShiftSchedule:
    """Which rotations of the cycle the model sees at each denoising step."""

    length: int
    skip: int
    num_steps: int
    start: float = 0.0
    end: float = 1.0
    polish: SeamPolish = field(default_factory=SeamPolish)

    def shifting(self, step: int) -> bool:
        """Whether ``step`` lies in the shift window ``[start, end)`` (fractions of the schedule)."""
        return self.start * self.num_steps <= step < self.end * self.num_steps

    def offset(self, step: int) -> int:
        """``o_i = (i * k) mod L`` inside the shift window, 0 outside it."""
        if self.skip == 0 or self.length <= 1 or not self.shifting(step):
            return 0
        return (step * self.skip) % self.length

    def polishing(self, step: int) -> bool:
        """Whether ``step`` is one of the final steps that seam polish rewrites (never for plain sampling)."""
        if self.skip == 0 or self.length <= 1:
            return False
        return step >= self.num_steps - self.polish.num_polish_steps(self.num_steps)

    def offsets(self, step: int) -> list[int]:
        """Every rotation whose predictions are combined at ``step`` (one, unless seam polish is active)."""
        base = self.offset(step)
        if not self.polishing(step):
            return [base]
        m = max(1, min(self.polish.num_offsets, self.length))
        spaced = [(base + round(j * self.length / m)) % self.length for j in range(m)]
        if self.polish.spread:
            first_polish = self.num_steps - self.polish.num_polish_steps(self.num_steps)
            return [spaced[(step - first_polish) % m]]
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
    """Mutable state shared by the transformer wrapper and the step callback (the step advances after each
    scheduler step, as in the reference algorithm)."""

    step: int = 0
    calls: int = 0


class CycleDenoiser:
    """Wraps a CogVideoX transformer ``forward``: rotate in, predict (whole cycle or wrapping windows), rotate back.

    Layout: CogVideoX hidden states are ``(B, T, C, H, W)``; the I2V image latents are concatenated on C, so they
    rotate together with the noisy latents and stay attached to their cycle position. CFG's conditional and
    unconditional halves are stacked on B and rotate together.
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
    ) -> None:
        self.forward = forward
        self.schedule = schedule
        self.state = state
        self.time_dim = time_dim
        self.window = window
        self.window_overlap = window_overlap
        self.override = override
        self.model_calls = 0

    def __call__(self, *args, **kwargs):
        if args:
            raise TypeError("CycleDenoiser expects keyword arguments, as diffusers pipelines pass them")
        hidden_states: torch.Tensor = kwargs.pop("hidden_states")
        timestep = kwargs.get("timestep")
        return_dict = kwargs.pop("return_dict", True)
        step = self.state.step
        self.state.calls += 1

        prediction = self.override(step, hidden_states, timestep) if self.override is not None else None
        if prediction is None:
            feather = self.schedule.feather(step)
            predictions, weights = [], []
            for offset in self.schedule.offsets(step):
                rolled = torch.roll(hidden_states, shifts=-offset, dims=self.time_dim) if offset else hidden_states
                out, weight = self._predict(rolled, kwargs, feather)
                predictions.append(torch.roll(out, shifts=offset, dims=self.time_dim) if offset else out)
                if weight is not None:
                    weights.append(torch.roll(weight, shifts=offset, dims=0) if offset else weight)
            if weights:
                prediction = self._blend(predictions, weights)
            else:
                prediction = predictions[0] if len(predictions) == 1 else torch.stack(predictions).mean(dim=0)

        if return_dict:
            from diffusers.models.modeling_outputs import Transformer2DModelOutput

            return Transformer2DModelOutput(sample=prediction)
        return (prediction,)

    def _call_model(self, hidden_states: torch.Tensor, kwargs: dict) -> torch.Tensor:
        self.model_calls += 1
        out = self.forward(hidden_states=hidden_states, return_dict=False, **kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out.sample

    def _time_view(self, weight: torch.Tensor, ndim: int) -> torch.Tensor:
        view = [1] * ndim
        view[self.time_dim] = weight.shape[0]
        return weight.view(view)

    def _blend(self, predictions: list[torch.Tensor], weights: list[torch.Tensor]) -> torch.Tensor:
        """Per-frame weighted mean of rotated-back predictions (seam polish feathering)."""
        total = sum(p.float() * self._time_view(w, p.dim()) for p, w in zip(predictions, weights))
        norm = self._time_view(sum(weights), predictions[0].dim())
        return (total / norm).to(predictions[0].dtype)

    def _predict(self, hidden_states: torch.Tensor, kwargs: dict,
                 feather: float = 0.0) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The model's prediction for the whole (rotated) cycle, and with ``feather > 0`` the per-frame weight it
        carries when rotations are blended (windows are then blended with edge-tapered weights too)."""
        length = hidden_states.shape[self.time_dim]
        if self.window is None or length <= self.window:
            out = self._call_model(hidden_states, kwargs)
            return out, (edge_taper(length, feather, out.device) if feather else None)
        rotary = kwargs.get("image_rotary_emb")
        total = None
        counts = torch.zeros(length, dtype=torch.float32, device=hidden_states.device)
        for idx in window_indices(length, self.window, self.window_overlap):
            idx = idx.to(hidden_states.device)
            window_kwargs = dict(kwargs)
            if rotary is not None:
                # The table is time-major with positions 0..L-1: its first `window` frames are the positions a
                # window of the trained length sees.
                rows = rotary[0].shape[0] // length * len(idx)
                window_kwargs["image_rotary_emb"] = (rotary[0][:rows], rotary[1][:rows])
            out = self._call_model(hidden_states.index_select(self.time_dim, idx), window_kwargs)
            if total is None:
                shape = list(out.shape)
                shape[self.time_dim] = length
                total = torch.zeros(shape, dtype=torch.float32, device=out.device)
            if feather:
                taper = edge_taper(len(idx), feather, out.device)
                total.index_add_(self.time_dim, idx, out.float() * self._time_view(taper, out.dim()))
                counts[idx] += taper
            else:
                total.index_add_(self.time_dim, idx, out.float())
                counts[idx] += 1
        view = [1] * total.dim()
        view[self.time_dim] = length
        return (total / counts.view(view)).to(out.dtype), (counts if feather else None)
