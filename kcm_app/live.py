"""Latest-only background work for one browser session: a burst of slider presses evaluates the
newest budget, never each stale one in turn.

Streamlit queues a widget event that arrives while a fragment is running and runs it after the
running one ends, so an evaluation done inside the script makes each press wait for the one before
it. Here the page hands the whole of a budget's slow work (evaluation, timing, and for a language
model the generation panel's continuations) to a ``LatestOnly`` runner (one per session) and returns at
once; a newer request abandons the running job at its next progress report (``Abandoned``: between
two evaluation batches, two timed forward passes, two generated tokens), waits for it to stop (one
computation at a time on shared cores), and then runs. A view whose results are all stored needs no
job: it abandons the running one (``keep_only``) and is drawn at once. The page draws the last
finished result, labelled with its budget, until the newest one arrives. No Streamlit here.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Hashable

from kcm_core.runtime import Progress

log = logging.getLogger("kcm_app.live")
if not log.handlers:    # the server's log says what was computed, read from disk, evaluated (tests read it)
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
    log.addHandler(_handler)
    log.setLevel(logging.INFO)
    log.propagate = False

# How long the page waits for a new budget inside the script run before drawing the previous result
# with a progress bar: long enough that a quick evaluation (the tiny test model) never flickers, short
# enough that the next key press is read within it.
FIRST_WAIT_S = 0.3
# How often a pending view (the Prune page's evaluation, the sidebar's background progress) reruns to
# look at its job. Each rerun costs the server's main thread and the GIL: at 0.5 s (and 1 s for the
# sidebar), on 2 shared cores, the server's main thread used 94% of a core and the background
# evaluation it was waiting for got 1.7 s of CPU in 2.5 minutes (py-spy and top, 2026-12-02).
POLL_S = 1.5
# How long a new job waits for the abandoned one before it starts anyway (see LatestOnly._work).
PREVIOUS_WAIT_S = 60.0


class Abandoned(Exception):
    """A newer request replaced this job; raised inside it at its next progress report."""


class Job:
    """One request: ``fn(progress)`` run on a worker thread; its progress, result or error."""

    def __init__(self, key: Hashable, fn: Callable[[Progress], Any]) -> None:
        self.key = key
        self.fn = fn
        self.message = "starting"
        self.fraction = 0.0
        self.result: Any = None
        self.error: BaseException | None = None
        self.seconds = 0.0
        self._done = threading.Event()
        self._cancelled = threading.Event()

    def progress(self, message: str, fraction: float) -> None:
        """The ``kcm_core`` progress callback: records where the job is, or stops it when abandoned."""
        if self._cancelled.is_set():
            raise Abandoned(f"abandoned for a newer request ({self.key!r})")
        self.message, self.fraction = message, fraction

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def abandoned(self) -> bool:
        return self._cancelled.is_set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Whether the job finished (successfully or not) within ``timeout`` seconds."""
        return self._done.wait(timeout)

    def outcome(self) -> Any:
        """The result, or the job's error raised here (call after ``done``)."""
        if self.error is not None:
            raise self.error
        return self.result

    def run(self) -> None:
        start = time.perf_counter()
        try:
            if self.abandoned:
                raise Abandoned(f"abandoned before it started ({self.key!r})")
            self.result = self.fn(self.progress)
        except BaseException as err:        # handed to the page, which shows it (or drops an Abandoned)
            self.error = err
        finally:
            self.seconds = time.perf_counter() - start
            self._done.set()


class LatestOnly:
    """Runs the newest request; a request for another key abandons the one running.

    ``finished`` lists the keys whose jobs ran to the end (successfully or with an error other than
    ``Abandoned``), in order: what a burst of requests actually computed.
    """

    def __init__(self, name: str = "evaluation") -> None:
        self.name = name
        self.finished: list[Hashable] = []
        self._lock = threading.Lock()
        self._job: Job | None = None
        self._thread: threading.Thread | None = None

    @property
    def current(self) -> Job | None:
        return self._job

    def keep_only(self, key: Hashable = None) -> Job | None:
        """Abandon the running job unless it is for ``key`` (a view that needs no job, such as a budget
        moved back to whose results are all stored, supersedes it all the same; ``None``: whatever
        runs); the job abandoned, if any. Returns at once: the job stops at its next progress report,
        on its own thread."""
        with self._lock:
            job = self._job
            if job is None or job.done or job.key == key or job.abandoned:
                return None
            job.cancel()
        log.info("%s superseded by a stored view: %r", self.name, job.key)
        return job

    def submit(self, key: Hashable, fn: Callable[[Progress], Any]) -> Job:
        """The job for ``key``: the running one when it is the newest request and was not abandoned
        (or the finished one that failed: its error is what the page shows), else a new one started
        after the previous one stops. A job that finished well is not handed out again: its results
        are in the shared store, so asking again means they were dropped from it."""
        with self._lock:
            job = self._job
            if (job is not None and job.key == key and not job.abandoned
                    and (not job.done or job.error is not None)):
                return job
            if job is not None and not job.done:
                job.cancel()
            job = Job(key, fn)
            log.info("%s requested: %r", self.name, key)
            thread = threading.Thread(target=self._work, args=(job, self._thread), daemon=True,
                                      name=f"kcm-{self.name}")
            self._job, self._thread = job, thread
            thread.start()
            return job

    def _work(self, job: Job, previous: threading.Thread | None) -> None:
        if previous is not None and previous.is_alive():
            job.message = "waiting for the previous budget to stop"
            # One computation at a time: the abandoned one stops at its next progress report. A step
            # that reports rarely is waited for at most PREVIOUS_WAIT_S; then this job starts anyway
            # (the shared store keeps results consistent), so a stuck job can never freeze the page.
            previous.join(PREVIOUS_WAIT_S)
            if previous.is_alive():
                log.warning("%s: the abandoned job is still running after %.0f s; starting %r anyway",
                            self.name, PREVIOUS_WAIT_S, job.key)
        job.run()
        if isinstance(job.error, Abandoned):
            log.info("%s abandoned: %r", self.name, job.key)
            return
        with self._lock:
            self.finished.append(job.key)
        log.info("%s finished in %.2f s: %r", self.name, job.seconds, job.key)


def stage(progress: Progress, name: str, index: int, count: int) -> Progress:
    """``progress`` for stage ``index`` of ``count`` of one job (its messages start with ``name``, its
    fractions cover the stage's share of the job); the job's own callback still decides whether to go on."""
    return lambda message, fraction: progress(f"{name}: {message}", (index + min(max(fraction, 0.0), 1.0)) / count)
