"""The first download of a model: progress in bytes, a free-disk check before it starts, and a way to stop it.

diffusers' ``DiffusionPipeline.download`` works out which files a pipeline needs and hands them to
``huggingface_hub.snapshot_download`` -- without a progress bar class of ours, so a 21 GB download used to report
nothing. :func:`watched_download` installs (once) a thin wrapper around the ``snapshot_download`` that diffusers
calls; for a download started inside ``watched_download`` it first asks the hub for a dry run (sizes, what is
already cached), refuses to start when the disk cannot hold the rest, then passes a byte counter as the
``tqdm_class``. The counter reports progress and raises :class:`DownloadCancelled` at the next chunk once the cancel
event is set (every file's worker stops at its next chunk; what was fetched stays in the cache and resumes next
time). Downloads started anywhere else pass through untouched.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

logger = logging.getLogger(__name__)

ByteProgress = Callable[[int, int], None]  # (bytes done, bytes to download)
# The disk must keep this much free after the download: the loader, logs and other programs need room too.
DISK_MARGIN_BYTES = 2 * 2**30
# Byte progress is reported at most this often (a download has thousands of chunks).
REPORT_EVERY_SECONDS = 0.5

_local = threading.local()
_install_lock = threading.Lock()


class DownloadCancelled(Exception):
    """A watched download was stopped through its cancel event (files fetched so far stay in the cache)."""


class NotEnoughDisk(Exception):
    """The files still to download do not fit on the disk holding the cache."""


@dataclass
class _Watch:
    progress: Optional[ByteProgress]
    cancel: Optional[threading.Event]
    cache_dir: Optional[str]
    total: int = 0
    bars: list = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    last_report: float = 0.0

    def check(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise DownloadCancelled("download stopped")

    def report(self, force: bool = False) -> None:
        if self.progress is None:
            return
        now = time.monotonic()
        if not force and now - self.last_report < REPORT_EVERY_SECONDS:
            return
        self.last_report = now
        # The hub keeps two byte counters (network bytes and bytes written); the larger is the truer one.
        done = max((bar.n for bar in self.bars if bar.counts_bytes), default=0)
        self.progress(min(done, self.total) if self.total else done, self.total)


def format_bytes(count: float) -> str:
    """``21.4 GB`` style (decimal units, as download sizes are usually quoted)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(count) < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"


def _bar_class(watch: _Watch) -> type:
    class ByteBar:
        """Mimics the part of tqdm that ``snapshot_download`` uses; counts, reports and honours the cancel event."""

        def __init__(self, *args: Any, total: Any = None, initial: int = 0, unit: str = "it", **kwargs: Any) -> None:
            self.total = total
            self.n = initial
            self.counts_bytes = unit == "B"
            self.desc = kwargs.get("desc", "")
            self.format_dict: dict = {"rate": None}
            with watch.lock:
                watch.bars.append(self)

        def __enter__(self) -> "ByteBar":
            return self

        def __exit__(self, *exc: Any) -> None:
            self.close()

        def update(self, n: Any = 1) -> None:
            watch.check()
            with watch.lock:
                self.n += int(n or 0)
                watch.report()

        def close(self) -> None:
            pass

        def refresh(self, *args: Any, **kwargs: Any) -> None:
            pass

        def set_description(self, *args: Any, **kwargs: Any) -> None:
            pass

        set_description_str = set_description

        def set_postfix_str(self, *args: Any, **kwargs: Any) -> None:
            pass

    return ByteBar


def _cache_root(cache_dir: Optional[str]) -> Path:
    if cache_dir:
        return Path(cache_dir)
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def check_disk_space(need_bytes: int, folder: Path, what: str = "the download") -> None:
    """Raise :class:`NotEnoughDisk` when ``folder``'s disk has less than ``need_bytes`` plus a margin free."""
    probe = Path(folder)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need_bytes + DISK_MARGIN_BYTES > free:
        raise NotEnoughDisk(f"not enough free disk space for {what}: it needs {format_bytes(need_bytes)} more in "
                            f"{folder} and only {format_bytes(free)} is free -- free some space, or point HF_HOME "
                            f"(or the cache folder) at a bigger disk")


def _wrapped_snapshot(original: Callable[..., Any]) -> Callable[..., Any]:
    def snapshot_download(*args: Any, **kwargs: Any) -> Any:
        watch: Optional[_Watch] = getattr(_local, "watch", None)
        if watch is None or kwargs.get("dry_run") or kwargs.get("local_files_only") or "tqdm_class" in kwargs:
            return original(*args, **kwargs)
        watch.check()
        plan = original(*args, **{**kwargs, "dry_run": True})
        watch.total = sum(int(info.file_size or 0) for info in plan if info.will_download)
        repo = args[0] if args else kwargs.get("repo_id", "the model")
        if watch.total:
            check_disk_space(watch.total, _cache_root(kwargs.get("cache_dir") or watch.cache_dir), f"{repo}")
            logger.info("downloading %s of %s", format_bytes(watch.total), repo)
        watch.report(force=True)
        result = original(*args, **kwargs, tqdm_class=_bar_class(watch))
        watch.report(force=True)
        return result

    snapshot_download.__loopui_wrapped__ = original  # type: ignore[attr-defined]
    return snapshot_download


def _install() -> bool:
    """Wrap the ``snapshot_download`` diffusers calls (once); False when diffusers no longer has it there."""
    import diffusers.pipelines.pipeline_utils as pipeline_utils

    with _install_lock:
        current = getattr(pipeline_utils, "snapshot_download", None)
        if current is None:
            logger.warning("diffusers does not call snapshot_download where loopui expects it: no download progress")
            return False
        if not hasattr(current, "__loopui_wrapped__"):
            pipeline_utils.snapshot_download = _wrapped_snapshot(current)
        return True


@contextmanager
def watched_download(progress: Optional[ByteProgress] = None, cancel: Optional[threading.Event] = None,
                     cache_dir: Optional[str] = None) -> Iterator[None]:
    """Within the block, a diffusers download on this thread reports bytes, checks the disk and can be stopped."""
    _install()
    previous = getattr(_local, "watch", None)
    _local.watch = _Watch(progress=progress, cancel=cancel, cache_dir=cache_dir)
    try:
        yield
    finally:
        _local.watch = previous
