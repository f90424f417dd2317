"""One generation at a time per pipeline.

``generate_loop`` installs its wrapper on the pipeline's denoisers, swaps its scheduler and RoPE preparation for the
length of a call. Two calls overlapping on one pipeline -- or on two pipelines built from the same components --
would wrap each other's wrappers and share scheduler state, and both loops come out wrong without an error. The lock
here serialises them: it covers the pipeline and every component it holds (transformer, ``transformer_2`` of a
two-expert model, VAE, scheduler, ...), so whatever two pipelines share, they take turns on it.
"""

from __future__ import annotations

import functools
import logging
import threading
import weakref
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional, TypeVar

from .errors import LoopInterrupted, PipelineBusy

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

_REGISTRY_LOCK = threading.Lock()
_LOCKS: "weakref.WeakKeyDictionary[Any, _OwnedLock]" = weakref.WeakKeyDictionary()
_WAIT_POLL_SECONDS = 0.05  # how often a waiting call looks at its cancel event


class _OwnedLock:
    """A lock that knows which thread holds it (re-entry from the same thread is an error, not a deadlock)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.owner: Optional[int] = None


def _lock_for(obj: Any) -> _OwnedLock:
    with _REGISTRY_LOCK:
        lock = _LOCKS.get(obj)
        if lock is None:
            lock = _LOCKS[obj] = _OwnedLock()
        return lock


def guarded_objects(pipe: Any) -> list[Any]:
    """The pipeline and each component it holds, in a fixed order (so two callers never lock in opposite orders)."""
    components = getattr(pipe, "components", None) or {}
    objects = {id(pipe): pipe}
    for value in components.values():
        if value is None or isinstance(value, (str, int, float, bool, tuple, list, dict)):
            continue
        try:
            weakref.ref(value)
            hash(value)
        except TypeError:  # not weak-referenceable or not hashable: nothing we could key a lock on
            continue
        objects[id(value)] = value
    return [objects[key] for key in sorted(objects)]


@contextmanager
def pipeline_lock(pipe: Any, cancel_event: Optional[threading.Event] = None,
                  cancelled: Optional[Callable[[], BaseException]] = None) -> Iterator[None]:
    """Hold ``pipe`` (and every component it holds) for one generation; waits while another call has it.

    While waiting, a set ``cancel_event`` ends the wait with ``cancelled()`` (default ``RuntimeError``). Re-entering
    from the thread that holds it raises :class:`PipelineBusy` instead of deadlocking.
    """
    me = threading.get_ident()
    locks = [_lock_for(obj) for obj in guarded_objects(pipe)]
    if any(lock.owner == me for lock in locks):
        raise PipelineBusy("generate_loop is already running on this pipeline in this thread (called from inside "
                           "its own callback?); run the second loop after the first returns")
    taken: list[_OwnedLock] = []
    try:
        for lock in locks:
            if not lock.lock.acquire(blocking=False):
                logger.info("pipeline in use by another generation: waiting for it to finish")
                while not lock.lock.acquire(timeout=_WAIT_POLL_SECONDS):
                    if cancel_event is not None and cancel_event.is_set():
                        raise (cancelled() if cancelled else RuntimeError("stopped while waiting for the pipeline"))
            lock.owner = me
            taken.append(lock)
        yield
    finally:
        for lock in reversed(taken):
            lock.owner = None
            lock.lock.release()


def holds_pipeline_lock(fn: F) -> F:
    """Decorator for ``fn(pipe, ...)``: the body runs under :func:`pipeline_lock` of ``pipe``.

    A ``cancel_event`` keyword argument of ``fn`` also ends the wait for the lock (raising the engine's
    ``LoopInterrupted``).
    """

    @functools.wraps(fn)
    def wrapper(pipe: Any, *args: Any, **kwargs: Any) -> Any:
        def cancelled() -> BaseException:
            return LoopInterrupted("stopped while waiting for the pipeline")

        with pipeline_lock(pipe, cancel_event=kwargs.get("cancel_event"), cancelled=cancelled):
            return fn(pipe, *args, **kwargs)

    return wrapper  # type: ignore[return-value]
