"""A loop-aware step cache: skip model calls where the noise level barely changes, in the cycle's own frame order.

Step caches made for ordinary sampling (diffusers' FirstBlockCache, MagCache, TaylorSeer, PyramidAttentionBroadcast,
FasterCache, TeaCache) sit below the latent shift, inside the transformer: a reused residual or attention map was
made for another rotation's frame order, and the loop comes out as a double exposure of itself shifted by the shift
skip, which seam ratios do not see (issue 15: 18-46 % from the uncached sample, lag correlation 0.65-0.78).
``generate_loop`` refuses a pipeline with one of them enabled when the cycle rotates (:func:`check_no_diffusers_cache`).

``step_cache="loop"`` lives above the rotation instead. The cycle wrapper rotates every prediction back before the
scheduler sees it, so what it stores is in cycle coordinates: per guidance branch, the clean estimates of the last two
computed steps, each with the weight every cycle frame had in the clips that made it (the feathered edge taper: a
frame next to a clip's cut counts little). A skipped step reuses their weighted blend -- the two clips' cuts lie a
shift skip apart, so each covers the other's cut -- turned into the model output that implies it at the skipped
step's own noise level. The rotation advances per computed step (a skipped step sees no rotation), so consecutive
model calls still see the cycle cut a shift skip apart. Seam polish's extra rotations happen inside one wrapper call:
they never shift the cache's counting of steps and branches.

Which steps are skipped (:func:`cache_skips`) depends on the noise levels only: never two in a row, never a polished
step, the first or the last, and only inside ``SIGMA_BAND`` where the noise drops by at most ``MAX_DROP`` since the
computed step before -- about a third of a 50-step schedule, nothing at 4-8 steps (there every step moves far).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from .noise import NoiseLevel, clean_estimate, prediction_for

# Noise fractions (``shift.noise_fraction``) where a step may reuse the last predictions: not the first steps, which
# set the composition, nor the last ones, which set the detail.
SIGMA_BAND = (0.15, 0.95)
# A step whose noise fraction is more than this below the last computed step's calls the model.
MAX_DROP = 0.04

# diffusers' cache hooks (diffusers.hooks, 0.42) and the technique each belongs to. TextKVCache is not here: it caches
# the text's keys and values, which do not depend on the frames.
_CACHE_HOOKS = {
    "fbc_leader_block_hook": "FirstBlockCache", "fbc_block_hook": "FirstBlockCache",
    "mag_cache_leader_block_hook": "MagCache", "mag_cache_block_hook": "MagCache",
    "taylorseer_cache": "TaylorSeerCache", "pyramid_attention_broadcast": "PyramidAttentionBroadcast",
    "faster_cache_denoiser": "FasterCache", "faster_cache_block": "FasterCache",
    "sea_cache_root": "SeaCache", "sea_cache_leader_block": "SeaCache", "sea_cache_block": "SeaCache",
}


def cache_skips(sigmas: Sequence[float], num_steps: int, keep: frozenset = frozenset()) -> frozenset[int]:
    """The steps the loop cache answers without the model, from the noise fraction before each step (``num_steps +
    1`` values); ``keep`` (the polished steps) always call it."""
    lo, hi = SIGMA_BAND
    skipped: set[int] = set()
    for i in range(1, num_steps - 1):
        if i in keep or (i - 1) in skipped:
            continue
        if lo <= sigmas[i] <= hi and sigmas[i - 1] - sigmas[i] <= MAX_DROP:
            skipped.add(i)
    return frozenset(skipped)


class LoopStepCache:
    """Clean estimates of the last two computed steps per guidance branch, in cycle coordinates, and their reuse.

    ``level(step)`` is the step's noise level; ``prediction_type`` the scheduler's (what the model outputs).
    """

    def __init__(self, level: Callable[[int], NoiseLevel], prediction_type: str, time_dim: int) -> None:
        self.level = level
        self.prediction_type = prediction_type
        self.time_dim = time_dim
        self._entries: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.reused = 0

    def store(self, branch: int, step: int, noisy: torch.Tensor, prediction: torch.Tensor,
              weights: torch.Tensor) -> None:
        """Keep the clean estimate ``prediction`` implies at ``noisy`` (both in cycle coordinates)."""
        x0 = clean_estimate(noisy, prediction, self.level(step), self.prediction_type)
        entries = self._entries.setdefault(branch, [])
        entries.append((x0, weights.to(x0.device)))
        del entries[:-2]

    def can_reuse(self, branch: int) -> bool:
        return bool(self._entries.get(branch))

    def reuse(self, branch: int, step: int, noisy: torch.Tensor) -> torch.Tensor:
        """The model output at ``step`` whose clean estimate is the weighted blend of the stored ones."""
        total, norm = None, None
        for x0, weights in self._entries[branch]:
            view = [1] * x0.dim()
            view[self.time_dim] = weights.shape[0]
            w = weights.view(view)
            total = x0 * w if total is None else total + x0 * w
            norm = w if norm is None else norm + w
        self.reused += 1
        blended = total / norm
        return prediction_for(noisy, blended, self.level(step), self.prediction_type).to(noisy.dtype)


def diffusers_caches(pipe: Any, modules: Sequence[torch.nn.Module]) -> list[str]:
    """The diffusers cache techniques enabled on ``modules`` (the pipeline's transformers), by name."""
    found = []
    for module in modules:
        config = getattr(module, "_cache_config", None)
        if config is not None and type(config).__name__ != "TextKVCacheConfig":
            found.append(type(config).__name__.removesuffix("Config"))
        for sub in module.modules():
            registry = getattr(sub, "_diffusers_hook", None)
            for name in getattr(registry, "hooks", {}) or {}:
                if name in _CACHE_HOOKS:
                    found.append(_CACHE_HOOKS[name])
    return list(dict.fromkeys(found))


def check_no_diffusers_cache(pipe: Any, modules: Sequence[torch.nn.Module], shift_skip: int) -> None:
    """Refuse, in one line, a pipeline with a diffusers step cache enabled when the cycle rotates (``shift_skip > 0``):
    such a cache reuses predictions made in another rotation's frame order (a ghosted loop)."""
    if shift_skip <= 0:
        return
    found = diffusers_caches(pipe, modules)
    if found:
        raise ValueError(f"pipe: diffusers' {', '.join(found)} is enabled on the transformer; under the latent shift "
                         f"it reuses predictions made in another rotation's frame order (a ghosted loop): call "
                         f"pipe.transformer.disable_cache() and use step_cache='loop' instead (or shift_skip=0)")
