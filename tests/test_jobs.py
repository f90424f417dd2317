"""The worker/event split of the app (``loopui.studio.jobs``): a generation runs in a thread and reports through
events; each session has one job; a waiting line in front of the GPUs; the progress clock. No server, no model."""

from __future__ import annotations

import threading
import time

import pytest

# -- jobs and the registry ----------------------------------------------------------------------------------------

def test_job_relays_progress_then_the_result_and_stops_on_cancel():
    from loopui.studio.jobs import JobRegistry

    registry = JobRegistry()

    def counting(report, cancel: threading.Event):
        for step in range(1, 4):
            report("denoise", step, 3)
        return "loop"

    job = registry.start("s1", counting)
    events = [e for e in job.events(heartbeat=0.01) if e is not None]
    assert [(e.kind, e.step) for e in events] == [("progress", 1), ("progress", 2), ("progress", 3), ("done", 0)]
    assert events[-1].payload == "loop"

    started = threading.Event()

    def endless(report, cancel: threading.Event):
        started.set()
        while not cancel.wait(0.01):
            report("denoise", 1, 1)
        raise RuntimeError("stopped")

    job = registry.start("s1", endless)
    assert started.wait(5) and registry.running() == 1
    assert registry.stop("s1") and not registry.stop("other-session")
    last = [e for e in job.events(heartbeat=0.01) if e is not None][-1]
    assert last.kind == "error" and str(last.payload) == "stopped"
    assert job.join(5) and registry.running() == 0


def test_a_new_job_of_a_session_cancels_the_running_one_and_stays_registered_after_it_exits():
    from loopui.studio.jobs import JobRegistry

    registry = JobRegistry()
    started = [threading.Event(), threading.Event()]

    def endless(index: int):
        def target(report, cancel: threading.Event):
            started[index].set()
            while not cancel.wait(0.01):
                pass
            return index

        return target

    first = registry.start("s1", endless(0))
    assert started[0].wait(5)
    second = registry.start("s1", endless(1))
    assert first.cancel_event.is_set() and not second.cancel_event.is_set()
    assert first.join(5) and started[1].wait(5)
    # The first worker's exit must not unregister the session's new job: Stop still reaches it.
    assert registry.running() == 1
    assert registry.stop("s1") is second
    assert second.join(5) and registry.running() == 0 and registry.stop("s1") is None


def test_jobs_started_without_replace_all_run_and_stop_cancels_them_all():
    """An API client's batch (one session, several jobs): none cancels another; Stop reaches every one."""
    from loopui.studio.jobs import JobRegistry

    registry = JobRegistry()
    release = threading.Event()

    def waiting(index: int):
        def target(report, cancel: threading.Event):
            release.wait(5)
            return index

        return target

    batch = [registry.start("client", waiting(i), replace=False) for i in range(3)]
    assert registry.running() == 3 and not any(job.cancel_event.is_set() for job in batch)
    release.set()
    assert [[e for e in job.events(heartbeat=0.01) if e is not None][-1].payload for job in batch] == [0, 1, 2]

    def endless(report, cancel: threading.Event):
        while not cancel.wait(0.01):
            pass
        return "stopped"

    running = [registry.start("client", endless, replace=False) for _ in range(2)]
    assert registry.stop("client") is running[-1]
    assert all(job.join(5) for job in running) and registry.running() == 0


def test_a_silent_worker_gets_heartbeats_and_a_failing_one_ends_with_its_error():
    from loopui.studio.jobs import LoopJob

    release = threading.Event()

    def slow(report, cancel):
        release.wait(5)
        return "late"

    job = LoopJob(slow).start()
    beats = 0
    for event in job.events(heartbeat=0.01):
        if event is None:
            beats += 1
            if beats == 3:
                release.set()
            continue
        assert (event.kind, event.payload) == ("done", "late")
    assert beats >= 3

    def failing(report, cancel):
        report("load", 50, 100, "half")
        raise RuntimeError("no weights")

    events = [e for e in LoopJob(failing).start().events(heartbeat=0.01) if e is not None]
    assert [(e.kind, e.stage, e.message) for e in events[:1]] == [("progress", "load", "half")]
    assert events[-1].kind == "error" and str(events[-1].payload) == "no weights"


# -- the waiting line in front of the GPU ------------------------------------------------------------------------

def test_line_is_first_come_first_served_and_reports_positions():
    from loopui.studio.jobs import LeftLine, LineFull, WaitingLine

    line = WaitingLine(slots=1, capacity=2)
    first = line.join()
    line.wait(first, threading.Event())  # a free slot: in at once
    second, third = line.join(), line.join()
    with pytest.raises(LineFull, match="busy: 2 loops are already waiting"):
        line.join()
    heard: list[tuple[int, int]] = []
    order: list[str] = []
    cancel_third = threading.Event()

    def wait_second():
        line.wait(second, threading.Event(), lambda ahead, waiting: heard.append((ahead, waiting)), poll=0.01)
        order.append("second")

    def wait_third():
        try:
            line.wait(third, cancel_third, poll=0.01)
        except LeftLine:
            order.append("third left")

    threads = [threading.Thread(target=wait_second), threading.Thread(target=wait_third)]
    for thread in threads:
        thread.start()
    time.sleep(0.1)
    assert heard == [(1, 2)]  # one loop (the running one) ahead, two waiting
    cancel_third.set()
    threads[1].join(5)
    assert order == ["third left"] and line.waiting == 1
    line.done(first)
    threads[0].join(5)
    assert order == ["third left", "second"] and line.waiting == 0
    line.done(second)
    line.wait(line.join(), threading.Event())  # the slot was given back


def test_a_place_given_back_before_its_turn_frees_the_line():
    from loopui.studio.jobs import LineFull, WaitingLine

    with pytest.raises(ValueError, match="^slots must be >= 1"):
        WaitingLine(slots=0)
    line = WaitingLine(slots=1, capacity=1)
    running = line.join()
    line.wait(running, threading.Event())
    waiting = line.join()
    with pytest.raises(LineFull):
        line.join()
    line.done(waiting)  # a request refused after joining (e.g. its job could not start): it leaves the line
    assert line.waiting == 0
    line.done(running)
    line.wait(line.join(), threading.Event())  # the slot is free again


# -- the progress clock -------------------------------------------------------------------------------------------

def test_progress_clock_reports_elapsed_and_what_is_left():
    from loopui.studio.jobs import JobEvent, ProgressClock
    from loopui.ui.updates import progress_view

    now = [100.0]
    clock = ProgressClock(clock=lambda: now[0])
    _, line = progress_view(JobEvent("progress", stage="queue", step=2, total=3), clock)
    assert line.startswith("Queued: 2 loops ahead of yours (position 3)")
    progress_view(JobEvent("progress", stage="load", step=0, total=100, message="Loading"), clock)
    now[0] = 110.0
    progress_view(JobEvent("progress", stage="denoise", step=1, total=21), clock)
    now[0] = 112.0
    (args, kwargs), _ = progress_view(JobEvent("progress", stage="denoise", step=5, total=21), clock)
    assert args == ((5, 21),)
    assert kwargs["desc"] == "Denoising · 12 s elapsed · about 8 s left"  # 0.5 s a step, 16 steps to go


def test_the_clock_starts_when_the_job_leaves_the_line():
    from loopui.studio.jobs import ProgressClock

    now = [50.0]
    clock = ProgressClock(clock=lambda: now[0])
    assert clock.times("queue", 3, 4) == (0.0, None)
    now[0] = 80.0  # half a minute in line does not count
    assert clock.times("load", 0, 100) == (0.0, None)
    now[0] = 84.0
    assert clock.times("denoise", 2, 10) == (4.0, None)  # the first step report only starts the estimate
    now[0] = 86.0
    assert clock.times("denoise", 4, 10) == (6.0, pytest.approx(6.0))  # 1 s a step, 6 steps to go


def test_stop_reaches_a_job_registered_but_not_yet_started(monkeypatch):
    """A Stop (or the page's next Generate) that comes between a job's registration and its thread's start still
    cancels it: the job is registered under the lock, its thread starts after."""
    from loopui.studio.jobs import JobRegistry, LoopJob

    registry = JobRegistry()
    started = []

    def target(report, cancel: threading.Event):
        started.append(cancel.is_set())
        return "ran"

    real_start = LoopJob.start

    def stop_first(job):
        registry.stop("s1")  # lands in the window before the worker thread exists
        return real_start(job)

    monkeypatch.setattr(LoopJob, "start", stop_first)
    job = registry.start("s1", target)
    assert job.join(5) and started == [True]
