"""Seam polish presets: which denoising steps combine several rotations of the cycle, chosen by noise level.

Measured on the exact toy denoiser of ``tests/instrument.py`` (docs/seam_polish.md, README "Fast loops"): in a long
schedule the interior seam is made at the final informative step, where the model saw the cycle cut in one place;
feathered blending of two rotations there brings the largest step down to that of an ordinary non-looping
generation at one extra model pass. In a few-step schedule every big step leaves a cut the later steps cannot heal
(4 UniPC steps: interior 3.0 unpolished, 1.17 polishing only the last): polishing every step that lowers the noise
fraction by at least ``MIN_DROP`` below ``MAX_SIGMA`` reaches the floor at 1.5-1.75x model calls, and skips the
near-identity last call of Euler's schedule (sigma ~ 0.009) for the one before it, where the seam forms. The
stronger levels use more rotations on more steps; insurance for real models whose seam forms earlier. Cost in model
passes is ``1 + (num_offsets - 1) * polished_steps / num_steps`` (1.02x / 1.12x / 1.30x at 50 steps).
"""

from __future__ import annotations

from typing import Optional, Sequence

from .shift import CACHE_FEATHER, SeamPolish

# Edge-taper exponent of the feathered blend; 1 leaves a little seam in window mode, 2 and 4 are equally clean.
FEATHER = CACHE_FEATHER  # the feathered blend of rotations (the loop cache weighs its clips alike)

# Steps noisier than this are healed by the steps after them (polishing them bought nothing on the instrument).
# Not 0.9: 4 UniPC steps at shift 3 sit exactly there (polishing it costs a step and gains nothing), while Euler's
# second of 4 steps (0.858 -> 0.602) leaves a cut worth polishing (interior 1.09 -> 1.02).
MAX_SIGMA = 0.87
# A step that lowers the noise fraction by this much leaves a cut the later steps do not heal. Steps of a 50-step
# schedule drop by under 0.06 (only the last is polished); 4-8 steps drop by 0.05-0.6.
MIN_DROP = 0.08

# level -> SeamPolish(offsets per polished step, fraction of the final informative steps (at least the last one),
# spread, feather, noisiest polished step, smallest noise drop polished)
SEAM_POLISH_PRESETS: dict[str, SeamPolish] = {
    "off": SeamPolish(),
    "fast": SeamPolish(num_offsets=2, fraction=0.02, feather=FEATHER, max_sigma=MAX_SIGMA, min_drop=MIN_DROP),
    "balanced": SeamPolish(num_offsets=3, fraction=0.06, feather=FEATHER, max_sigma=MAX_SIGMA, min_drop=MIN_DROP),
    "strong": SeamPolish(num_offsets=4, fraction=0.10, feather=FEATHER, max_sigma=MAX_SIGMA, min_drop=MIN_DROP),
}


def polish_cost(level: str, num_steps: int, sigmas: Optional[Sequence[float]] = None) -> float:
    """Model passes relative to unpolished sampling: ``1 + (num_offsets - 1) * polished_steps / num_steps``.

    ``sigmas``: the schedule's noise fractions (``num_steps + 1`` values, see ``SeamPolish.polished_steps``); without
    them the last ``fraction`` of the steps is counted. Window mode multiplies every pass by the same number of
    windows, so the ratio is the same there.
    """
    polish = SEAM_POLISH_PRESETS[level]
    if num_steps <= 0:
        raise ValueError(f"num_steps must be positive, got {num_steps}")
    extra = (max(1, polish.num_offsets) - 1) * len(polish.polished_steps(num_steps, sigmas))
    return 1.0 + extra / num_steps
