"""Seam polish presets: how the last denoising steps combine several rotations of the cycle.

Measured on the exact toy denoiser of ``tests/instrument.py`` (docs/seam_polish.md): the interior seam is made at
the final step, where the model saw the cycle cut in one place; feathered blending of two rotations there brings the
largest step down to that of an ordinary non-looping generation at one extra model pass. The stronger levels polish
more of the final steps with more rotations: on the instrument they are no better than ``fast``; they are insurance
for real models whose seam forms over more than the last step. Cost in model passes is
``1 + (num_offsets - 1) * polished_steps / num_steps`` (1.02x / 1.12x / 1.30x at 50 steps).
"""

from __future__ import annotations

from .shift import SeamPolish

# Edge-taper exponent of the feathered blend; 1 leaves a little seam in window mode, 2 and 4 are equally clean.
FEATHER = 2.0

# level -> SeamPolish(offsets per polished step, fraction of final steps (at least the last one), spread, feather)
SEAM_POLISH_PRESETS: dict[str, SeamPolish] = {
    "off": SeamPolish(),
    "fast": SeamPolish(num_offsets=2, fraction=0.02, feather=FEATHER),
    "balanced": SeamPolish(num_offsets=3, fraction=0.06, feather=FEATHER),
    "strong": SeamPolish(num_offsets=4, fraction=0.10, feather=FEATHER),
}


def polish_cost(level: str, num_steps: int) -> float:
    """Model passes relative to unpolished sampling: ``1 + (num_offsets - 1) * polished_steps / num_steps``.

    Window mode multiplies every pass by the same number of windows, so the ratio is the same there.
    """
    polish = SEAM_POLISH_PRESETS[level]
    if num_steps <= 0:
        raise ValueError(f"num_steps must be positive, got {num_steps}")
    extra = (max(1, polish.num_offsets) - 1) * polish.num_polish_steps(num_steps)
    return 1.0 + extra / num_steps
