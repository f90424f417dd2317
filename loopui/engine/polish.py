"""Seam polish: presets for averaging the model over several cycle offsets near the end of the schedule."""

from __future__ import annotations

from .shift import SeamPolish

# level -> SeamPolish(offsets averaged, fraction of final steps, spread one offset per step)
SEAM_POLISH_PRESETS: dict[str, SeamPolish] = {
    "off": SeamPolish(),
    "fast": SeamPolish(num_offsets=2, fraction=0.2, spread=False),
    "balanced": SeamPolish(num_offsets=3, fraction=0.2, spread=False),
    "strong": SeamPolish(num_offsets=4, fraction=0.3, spread=False),
}
