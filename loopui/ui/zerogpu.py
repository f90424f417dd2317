"""``spaces.GPU`` for the page's generate event when the ``spaces`` package is installed, else a no-op: it costs
nothing off Hugging Face Spaces. (It wraps a Gradio event and reads Gradio's request context, hence the page's.)"""

from __future__ import annotations

import logging
from typing import Any, Callable, TypeVar, Union

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])
Duration = Union[int, Callable[..., int]]


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
