"""Worker/event split for the app: a generation runs in a thread and reports through a queue (no gradio here).

The UI generator only reads events and yields progress, so cancelling the Gradio event (which cannot stop a
running thread) is backed by a ``threading.Event`` that the engine checks in its step callback.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

logger = logging.getLogger(__name__)

ProgressCallback = Callable[..., None]  # (stage, step, total[, message]) -- the engine's callback plus a note
JobTarget = Callable[[ProgressCallback, threading.Event], Any]

TERMINAL_KINDS = ("done", "error")


@dataclass(frozen=True)
class JobEvent:
    """One message from the worker: ``progress`` (stage, step, total, message), ``done`` (payload = result) or
    ``error`` (payload = the exception the target raised, e.g. ``LoopInterrupted`` after a stop)."""

    kind: str
    stage: str = ""
    step: int = 0
    total: int = 0
    message: str = ""
    payload: Any = None


class LoopJob:
    """One generation running in a daemon thread; ``events()`` yields its progress until it ends."""

    def __init__(self, target: JobTarget, name: str = "loopui-job",
                 on_exit: Optional[Callable[["LoopJob"], None]] = None) -> None:
        self._target = target
        self._on_exit = on_exit
        self._events: "queue.Queue[JobEvent]" = queue.Queue()
        self.cancel_event = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> "LoopJob":
        """Start the worker thread; returns ``self`` so calls chain."""
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def cancel(self) -> None:
        """Ask the worker to stop; the engine notices within one denoising step."""
        self.cancel_event.set()

    def join(self, timeout: Optional[float] = None) -> bool:
        """Wait for the worker; True when it has finished."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _progress(self, stage: str, step: int, total: int, message: str = "") -> None:
        self._events.put(JobEvent("progress", stage=stage, step=int(step), total=int(total), message=message))

    def _run(self) -> None:
        try:
            result = self._target(self._progress, self.cancel_event)
        except Exception as exc:  # handed to the UI thread, which turns it into a readable message
            self._events.put(JobEvent("error", payload=exc))
        else:
            self._events.put(JobEvent("done", payload=result))
        finally:
            if self._on_exit is not None:
                self._on_exit(self)

    def events(self, heartbeat: float = 0.25) -> Iterator[Optional[JobEvent]]:
        """Yield events until ``done``/``error`` (included); ``None`` every ``heartbeat`` seconds of silence.

        The heartbeats let a Gradio generator yield regularly, which is when Gradio can close it after a cancel.
        """
        while True:
            try:
                event = self._events.get(timeout=heartbeat)
            except queue.Empty:
                yield None
                continue
            yield event
            if event.kind in TERMINAL_KINDS:
                return


class JobRegistry:
    """The running job of each session, so a Stop request can reach the worker of the same session."""

    def __init__(self) -> None:
        self._jobs: dict[str, LoopJob] = {}
        self._lock = threading.Lock()

    def start(self, session: str, target: JobTarget) -> LoopJob:
        """Start ``target`` as the session's job (a still-running previous job of the session is cancelled).

        The job stays registered until its worker thread ends, even when the page stopped listening to it.
        """
        job = LoopJob(target, name=f"loopui-job-{session[:8]}", on_exit=lambda j: self._finish(session, j))
        with self._lock:
            previous = self._jobs.get(session)
            if previous is not None and previous.running:
                previous.cancel()
            self._jobs[session] = job
        return job.start()

    def _finish(self, session: str, job: LoopJob) -> None:
        """Forget ``job`` if it is still the session's current one (called by the worker as it exits)."""
        with self._lock:
            if self._jobs.get(session) is job:
                del self._jobs[session]

    def stop(self, session: str) -> bool:
        """Cancel the session's running job; False when there was none."""
        with self._lock:
            job = self._jobs.get(session)
        if job is None or not job.running:
            return False
        job.cancel()
        logger.info("stop requested for session %s", session[:8])
        return True

    def running(self) -> int:
        """How many worker threads are running now (all sessions)."""
        with self._lock:
            return sum(job.running for job in self._jobs.values())
