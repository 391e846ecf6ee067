"""Qt-free background jobs: run long work (model loading, encoding) in a worker thread with progress and cancel.

The GUI polls a ``JobMonitor`` from a timer on the main thread; callbacks therefore always run on the thread
that calls ``tick()``, so they may touch Qt and MRML. The worker never does.

    job = BackgroundJob(lambda progress, cancelled: encode(volume, model, progress, cancelled))
    monitor = JobMonitor(job.start(), on_progress=..., on_done=..., on_error=..., on_cancelled=...)
    # main thread, every 100 ms:  if not monitor.tick(): stop the timer
"""

from __future__ import annotations

import enum
import logging
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Optional

from ctvl.errors import CTVLCancelled

log = logging.getLogger(__name__)

ProgressFn = Callable[[float, str], None]
CancelledFn = Callable[[], bool]
WorkFn = Callable[[ProgressFn, CancelledFn], Any]


class JobState(enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


@dataclass(frozen=True)
class JobStatus:
    """A consistent snapshot of a job, safe to read on any thread."""

    state: JobState
    fraction: float
    message: str
    result: Any = None
    error: Optional[BaseException] = None
    traceback: str = ""
    elapsed_s: float = 0.0


class BackgroundJob:
    """Runs ``work(progress, cancelled)`` once in a daemon thread.

    ``work`` should call ``progress(fraction, message)`` now and then (it raises ``CTVLCancelled`` once cancel
    was requested) and/or poll ``cancelled()``. A job whose cancel was requested never reports a result, even
    if ``work`` returned: the caller can rely on "cancelled -> nothing to apply".
    """

    def __init__(self, work: WorkFn, name: str = "ctvl-job") -> None:
        self._work = work
        self.name = name
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self._finished = threading.Event()
        self._thread: threading.Thread | None = None
        self._state = JobState.PENDING
        self._fraction = 0.0
        self._message = ""
        self._result: Any = None
        self._error: BaseException | None = None
        self._traceback = ""
        self._t0 = 0.0
        self._t1: float | None = None

    # ---------------------------------------------------------------- control (any thread)
    def start(self) -> BackgroundJob:
        with self._lock:
            if self._state is not JobState.PENDING:
                raise RuntimeError(f"job {self.name} was already started")
            self._state = JobState.RUNNING
            self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        return self

    def cancel(self) -> None:
        """Ask the work to stop; it stops at its next progress report / cancel check."""
        self._cancel.set()
        with self._lock:
            if self._state is JobState.PENDING:
                self._finish(JobState.CANCELLED)

    def cancelled(self) -> bool:
        """True once cancel was requested (pass this as the ``cancel`` callable of ``ctvl.inference.encode``)."""
        return self._cancel.is_set()

    def wait(self, timeout: float | None = None) -> JobStatus:
        self._finished.wait(timeout)
        return self.status()

    @property
    def done(self) -> bool:
        return self._finished.is_set()

    def status(self) -> JobStatus:
        with self._lock:
            end = self._t1 if self._t1 is not None else time.perf_counter()
            return JobStatus(self._state, self._fraction, self._message, self._result, self._error,
                             self._traceback, (end - self._t0) if self._t0 else 0.0)

    # ---------------------------------------------------------------- worker side
    def progress(self, fraction: float, message: str = "") -> None:
        if self._cancel.is_set():
            raise CTVLCancelled(f"{self.name} cancelled")
        with self._lock:
            self._fraction = float(min(max(fraction, 0.0), 1.0))
            if message:
                self._message = message

    def _finish(self, state: JobState, result: Any = None, error: BaseException | None = None,
                tb: str = "") -> None:
        # caller holds the lock
        self._state, self._result, self._error, self._traceback = state, result, error, tb
        if state is JobState.SUCCEEDED:
            self._fraction = 1.0
        self._t1 = time.perf_counter()
        self._finished.set()

    def _run(self) -> None:
        try:
            result = self._work(self.progress, self.cancelled)
        except CTVLCancelled:
            with self._lock:
                self._finish(JobState.CANCELLED)
        except BaseException as exc:  # noqa: BLE001 - reported to the main thread, never lost
            tb = traceback.format_exc()
            log.debug("job %s failed:\n%s", self.name, tb)
            with self._lock:
                if self._cancel.is_set():
                    self._finish(JobState.CANCELLED)
                else:
                    self._finish(JobState.FAILED, error=exc, tb=tb)
        else:
            with self._lock:
                if self._cancel.is_set():
                    self._finish(JobState.CANCELLED)
                else:
                    self._finish(JobState.SUCCEEDED, result=result)


class JobMonitor:
    """Turns a job's status into callbacks, each called on the thread that calls ``tick()``.

    ``on_progress(fraction, message)`` when either changed; then exactly one of ``on_done(result)``,
    ``on_error(exception, traceback_text)`` or ``on_cancelled()``. An exception raised by ``on_done`` is
    passed to ``on_error`` (so a failing scene update surfaces like a failing job).
    """

    def __init__(self, job: BackgroundJob, on_progress: ProgressFn | None = None,
                 on_done: Callable[[Any], None] | None = None,
                 on_error: Callable[[BaseException, str], None] | None = None,
                 on_cancelled: Callable[[], None] | None = None) -> None:
        self.job = job
        self.on_progress, self.on_done, self.on_error, self.on_cancelled = on_progress, on_done, on_error, \
            on_cancelled
        self._last: tuple[float, str] | None = None
        self._reported = False

    @property
    def finished(self) -> bool:
        return self._reported

    def tick(self) -> bool:
        """Dispatch callbacks; returns True while the job still needs polling."""
        if self._reported:
            return False
        status = self.job.status()
        if self.on_progress is not None and (status.fraction, status.message) != self._last:
            self._last = (status.fraction, status.message)
            self.on_progress(status.fraction, status.message)
        if not status.state.finished:
            return True
        self._reported = True
        if status.state is JobState.SUCCEEDED:
            if self.on_done is not None:
                try:
                    self.on_done(status.result)
                except Exception as exc:  # noqa: BLE001
                    if self.on_error is None:
                        raise
                    self.on_error(exc, traceback.format_exc())
        elif status.state is JobState.FAILED:
            if self.on_error is not None:
                self.on_error(status.error or RuntimeError("job failed"), status.traceback)
        elif self.on_cancelled is not None:
            self.on_cancelled()
        return False

    def run_until_done(self, interval_s: float = 0.02, timeout_s: float | None = None) -> JobStatus:
        """Poll in a loop (batch mode and tests); returns the final status."""
        t0 = time.perf_counter()
        while self.tick():
            if timeout_s is not None and time.perf_counter() - t0 > timeout_s:
                raise TimeoutError(f"job {self.job.name} still running after {timeout_s} s")
            self.job.wait(interval_s)
        return self.job.status()
