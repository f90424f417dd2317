"""The engine's errors: what a caller of ``generate_loop`` / ``render_loop`` may catch besides ``ValueError``."""

from __future__ import annotations


class LoopInterrupted(RuntimeError):
    """Raised when a generation was stopped through its ``cancel_event``."""


class NonFiniteOutput(RuntimeError):
    """The model produced NaN or infinite values (the video would come out black); the message says what to try."""


class PipelineBusy(RuntimeError):
    """A call re-entered ``generate_loop`` on a pipeline its own thread is already running."""
