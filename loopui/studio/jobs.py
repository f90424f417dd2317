"""Worker/event split for the app: a generation runs in a thread and reports through a queue (no gradio here).

The UI generator only reads events and yields progress, so cancelling the Gradio event (which cannot stop a
running thread) is backed by a ``threading.Event`` that the engine checks in its step callback.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

logger = logging.getLogger(__name__)

ProgressCallback = Callable[..., None]  # (stage, step, total[, message]) -- the engine's callback plus a note
JobTarget = Callable[[ProgressCallback, threading.Event], Any]

TERMINAL_KINDS = ("done", "error")


class LineFull(ValueError):
    """The waiting line in front of the GPU is full: the request is refused at once (a clear "busy" message)."""


class LeftLine(RuntimeError):
    """A job was stopped while it waited in line: it never started."""


class Ticket:
    """One job's place in a :class:`WaitingLine`."""

    __slots__ = ("admitted",)

    def __init__(self) -> None:
        self.admitted = False


class WaitingLine:
    """First come, first served, in front of the GPU: ``slots`` jobs run at once, at most ``capacity`` wait.

    ``join`` is called by the request's thread (so a full line is refused before anything starts); ``wait`` by the
    job's worker, which hears its position while it waits and leaves the line when its cancel event is set.
    """

    def __init__(self, slots: int = 1, capacity: int = 16) -> None:
        if slots < 1 or capacity < 0:
            raise ValueError(f"slots must be >= 1 and capacity >= 0, got {slots!r}, {capacity!r}")
        self.slots = slots
        self.capacity = capacity
        self._waiting: list[Ticket] = []
        self._running = 0
        self._cond = threading.Condition()

    def join(self) -> Ticket:
        """A place at the end of the line; :class:`LineFull` when ``capacity`` jobs already wait."""
        with self._cond:
            waiting = len(self._waiting)
            if waiting >= self.capacity and self._running + waiting >= self.slots:
                raise LineFull(f"busy: {waiting} loop{' is' if waiting == 1 else 's are'} already waiting for the "
                               "GPU (the line is full); try again in a few minutes")
            ticket = Ticket()
            self._waiting.append(ticket)
            return ticket

    def wait(self, ticket: Ticket, cancel: threading.Event,
             on_position: Optional[Callable[[int, int], None]] = None, poll: float = 0.1) -> None:
        """Block until it is ``ticket``'s turn. ``on_position(ahead, waiting)`` hears how many jobs are ahead
        (running or waiting) whenever that changes; a set ``cancel`` leaves the line and raises :class:`LeftLine`."""
        last = None
        with self._cond:
            while True:
                if cancel.is_set():
                    self._waiting.remove(ticket)
                    self._cond.notify_all()
                    raise LeftLine("left the queue before it started")
                index = self._waiting.index(ticket)
                if index == 0 and self._running < self.slots:
                    self._waiting.pop(0)
                    self._running += 1
                    ticket.admitted = True
                    self._cond.notify_all()
                    return
                ahead = self._running + index
                if on_position is not None and ahead != last:
                    last = ahead
                    on_position(ahead, len(self._waiting))
                self._cond.wait(poll)

    def done(self, ticket: Ticket) -> None:
        """Give the slot back (after the job ran) or leave the line (if it never got in)."""
        with self._cond:
            if ticket.admitted:
                ticket.admitted = False
                self._running -= 1
            elif ticket in self._waiting:
                self._waiting.remove(ticket)
            self._cond.notify_all()

    @property
    def waiting(self) -> int:
        """How many jobs wait now (not counting the running ones)."""
        with self._cond:
            return len(self._waiting)


class ProgressClock:
    """Elapsed time of a job (from when it left the line) and an estimate of the denoising time left."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.started: Optional[float] = None
        self._denoise: Optional[tuple[float, int]] = None  # (time, step) of the first denoising report

    def times(self, stage: str, step: int, total: int) -> tuple[float, Optional[float]]:
        """(seconds elapsed, seconds of denoising left or None when unknown) at this progress report."""
        now = self._clock()
        if stage == "queue":
            return 0.0, None
        if self.started is None:
            self.started = now
        left = None
        if stage == "denoise":
            if self._denoise is None:
                # The first report comes after the first step; time it from the job's start or the last stage.
                self._denoise = (now, step)
            else:
                t0, s0 = self._denoise
                if step > s0:
                    left = (now - t0) / (step - s0) * max(total - step, 0)
        return now - self.started, left


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
        self.stage = ""  # the last progress stage reported ("queue" while it waits in line)
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
        self.stage = stage
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
    """The running jobs of each session, so a Stop request can reach the workers of the same session."""

    def __init__(self) -> None:
        self._jobs: dict[str, list[LoopJob]] = {}
        self._lock = threading.Lock()

    def start(self, session: str, target: JobTarget, replace: bool = True) -> LoopJob:
        """Start ``target`` as a job of the session. With ``replace`` (the page's Generate: one loop per tab) the
        session's still-running jobs are cancelled first; without it (an API client submitting a batch) they go on.

        A job stays registered until its worker thread ends, even when the page stopped listening to it.
        """
        job = LoopJob(target, name=f"loopui-job-{session[:8]}", on_exit=lambda j: self._finish(session, j))
        with self._lock:
            jobs = self._jobs.setdefault(session, [])
            if replace:
                # Every registered job, started or about to start (a job's thread starts after this lock is let
                # go): cancelling one that already ended does nothing, and it leaves the list as it exits.
                for previous in jobs:
                    previous.cancel()
            jobs.append(job)
        return job.start()

    def _finish(self, session: str, job: LoopJob) -> None:
        """Forget ``job`` (called by the worker as it exits)."""
        with self._lock:
            jobs = self._jobs.get(session, [])
            if job in jobs:
                jobs.remove(job)
            if not jobs:
                self._jobs.pop(session, None)

    def stop(self, session: str) -> Optional[LoopJob]:
        """Cancel every job of the session (running, or registered and about to start); return the newest of them
        (its ``stage`` says whether it was still waiting in line), None when there was none."""
        with self._lock:
            jobs = [job for job in self._jobs.get(session, []) if not job.cancel_event.is_set()]
        for job in jobs:
            job.cancel()
            logger.info("stop requested for session %s (stage %s)", session[:8], job.stage or "start")
        return jobs[-1] if jobs else None

    def running(self) -> int:
        """How many worker threads are running now (all sessions)."""
        with self._lock:
            return sum(job.running for jobs in self._jobs.values() for job in jobs)
