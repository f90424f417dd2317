"""Array helpers shared by the media modules (private)."""

from __future__ import annotations

from typing import Any

import numpy as np


def as_numpy(x: Any) -> np.ndarray:
    """Return ``x`` as a numpy array; torch tensors are detached and moved to the CPU first.

    Duck-typed on ``.detach`` so that this leaf module never imports torch. Floating tensors go through
    ``.float()`` because numpy has no bfloat16; integer tensors (uint8 frames) keep their dtype.
    """
    if hasattr(x, "detach"):
        t = x.detach().cpu()
        if t.is_floating_point():
            t = t.float()
        return np.asarray(t)
    return np.asarray(x)
