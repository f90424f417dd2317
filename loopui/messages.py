"""Text every room shares: the project's one formatter for one-line error messages.

A leaf: it imports nothing from loopui, so the engine, models, media, saliency, the UI and the CLI may all use it.
"""

from __future__ import annotations

from typing import Optional

# A reason quoted inside a longer message (a load failure and what to do about it) is cut to this length.
REASON_LIMIT = 240


def one_line(error: BaseException | str, limit: Optional[int] = None) -> str:
    """``error``'s message on one line: runs of whitespace (newlines too) collapsed to one space, the exception's
    class name when the message is empty, and, with ``limit``, cut to that many characters ending in ``...``."""
    text = " ".join(str(error).split())
    if not text and isinstance(error, BaseException):
        text = type(error).__name__
    if limit is not None and len(text) > limit:
        text = text[: limit - 3] + "..."
    return text
