"""Hugging Face Spaces support that costs nothing elsewhere: ``spaces.GPU`` when installed, else a no-op."""

from __future__ import annotations

import logging
from typing import Any, Callable, TypeVar

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


def gpu_decorator(duration: int = 120) -> Callable[[F], F]:
    """``spaces.GPU(duration=...)`` when the ``spaces`` package is importable (it is itself a no-op unless the
    Space runs on ZeroGPU); otherwise a decorator that returns the function unchanged."""
    try:
        import spaces  # type: ignore[import-not-found]
    except ImportError:
        return lambda fn: fn
    logger.info("spaces package found: generation runs under spaces.GPU(duration=%d)", duration)
    return spaces.GPU(duration=duration)
