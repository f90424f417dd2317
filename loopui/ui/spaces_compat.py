"""Hugging Face Spaces support that costs nothing elsewhere: ``spaces.GPU`` when installed, else a no-op."""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, TypeVar, Union

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])
Duration = Union[int, Callable[..., int]]


def on_zero_gpu() -> bool:
    """Whether this process runs on a ZeroGPU Space (``SPACES_ZERO_GPU`` set and the ``spaces`` package present)."""
    if os.environ.get("SPACES_ZERO_GPU", "").strip().lower() not in ("1", "true", "yes"):
        return False
    try:
        import spaces  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        logger.warning("SPACES_ZERO_GPU is set but the spaces package is missing: running as a plain GPU app")
        return False
    return True


def gpu_decorator(duration: Duration = 120) -> Callable[[F], F]:
    """``spaces.GPU(duration=...)`` when the ``spaces`` package is importable (it is itself a no-op unless the
    Space runs on ZeroGPU); otherwise a decorator that returns the function unchanged. ``duration`` may be a
    callable taking the decorated function's arguments (ZeroGPU's dynamic duration)."""
    try:
        import spaces  # type: ignore[import-not-found]
    except ImportError:
        return lambda fn: fn
    logger.info("spaces package found: generation runs under spaces.GPU(duration=%s)",
                getattr(duration, "__name__", duration))
    return spaces.GPU(duration=duration)
