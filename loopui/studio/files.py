"""Session files: one output folder per browser session under the temp dir, loops named by a server-wide counter,
and housekeeping that keeps the folders within an age and a total size."""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

logger = logging.getLogger(__name__)

OUTPUT_SUFFIXES = (".mp4", ".gif", ".webp")
SESSION_ROOT_NAME = "loopui-sessions"
# Housekeeping of session outputs: files older than this, or beyond this total (oldest first), are deleted.
DEFAULT_MAX_OUTPUT_AGE_S = 24 * 3600.0
DEFAULT_MAX_OUTPUT_BYTES = 2 * 2**30


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "", text)[:32] or "anonymous"


class SessionFiles:
    """The session folders under ``root`` (default: ``loopui-sessions`` in the temp dir, where Gradio may serve
    files from); files older than ``max_age_s`` or beyond ``max_bytes`` in total are swept."""

    def __init__(self, root: Optional[Path] = None, max_age_s: float = DEFAULT_MAX_OUTPUT_AGE_S,
                 max_bytes: int = DEFAULT_MAX_OUTPUT_BYTES) -> None:
        if max_age_s <= 0 or max_bytes <= 0:
            raise ValueError(f"output limits must be positive, got age {max_age_s!r} s and size "
                             f"{max_bytes!r} bytes")
        self.root = Path(root) if root is not None else Path(tempfile.gettempdir()) / SESSION_ROOT_NAME
        self.max_age_s = max_age_s
        self.max_bytes = max_bytes
        self._counter = 0
        self._lock = threading.Lock()

    def session_dir(self, session: str) -> Path:
        """This session's output folder (created)."""
        path = self.root / _safe_name(session)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def drop(self, session: str) -> None:
        """Delete a session's files (when its browser tab goes away)."""
        shutil.rmtree(self.root / _safe_name(session), ignore_errors=True)

    def sweep(self, now: Optional[float] = None) -> int:
        """Housekeeping: delete session files older than ``max_age_s``, then the oldest ones until all together
        fit in ``max_bytes``; empty session folders go too. Returns how many files were deleted."""
        return sweep_folder(self.root, self.max_age_s, self.max_bytes, now=now)

    def next_loop(self, session: str, seed: int) -> tuple[int, Path, list[Path]]:
        """(index, stem, output paths) of the session's next loop: ``loop-007-seed42`` with one file per
        ``OUTPUT_SUFFIXES``; the index counts every loop of the server."""
        with self._lock:
            self._counter += 1
            index = self._counter
        stem = self.session_dir(session) / f"loop-{index:03d}-seed{seed}"
        return index, stem, [stem.with_suffix(s) for s in OUTPUT_SUFFIXES]


def sweep_folder(root: Path, max_age_s: float, max_bytes: int, now: Optional[float] = None) -> int:
    """Delete files under ``root`` older than ``max_age_s``, then the oldest until the rest fit in ``max_bytes``;
    remove folders left empty. Returns the number of files deleted. Files that vanish meanwhile are skipped."""
    now = time.time() if now is None else now
    if not root.is_dir():
        return 0
    files = []
    for path in root.rglob("*"):
        try:
            if path.is_file():
                stat = path.stat()
                files.append((stat.st_mtime, stat.st_size, path))
        except OSError:
            continue
    files.sort()
    removed = 0
    total = sum(size for _, size, _ in files)
    for mtime, size, path in files:
        if now - mtime <= max_age_s and total <= max_bytes:
            break
        try:
            path.unlink()
        except OSError as exc:
            logger.warning("could not delete old output %s: %s", path, exc)
            continue
        removed += 1
        total -= size
    for folder in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        try:
            folder.rmdir()  # only succeeds when empty; the exporter re-creates a session's folder when it writes
        except OSError:
            pass
    if removed:
        logger.info("housekeeping: deleted %d old output files under %s", removed, root)
    return removed
