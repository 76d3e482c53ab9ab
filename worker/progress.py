"""What one turn attempt tells the outside world as it goes.

Three audiences, one object: the stage log (worker/logs.py), the Prometheus metrics
(worker/metrics.py), and Celery (a ``STREAMING`` task state with progress metadata that Flower
shows live). The turn calls it at each stage; the cost on the hot path, per delta, is a clock
read and a comparison, and a progress report due is handed to the process's
``ProgressReporter`` rather than sent by the turn.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from worker import metrics
from worker.logs import log_stage, ms
from worker.publisher import TurnIds

log = logging.getLogger(__name__)

# Sends one turn's progress to Celery: (task id, progress).
ProgressSender = Callable[[str, dict[str, Any]], None]


class ProgressReporter:
    """Sends the running turns' progress reports for the whole process, one after another.

    Sent by the turn, a report cost it two Redis round trips (a result-backend write and a task
    event) between two of its events, ~0.7 ms of CPU, most of it building a Celery event
    dispatcher each time. Here one long-lived sender takes them in turn; a report not yet sent
    is replaced by its turn's newer one. A turn that ends withdraws its report, and waits for
    one being sent, so that a late ``STREAMING`` never overwrites the task's final state.
    """

    def __init__(self, send: ProgressSender) -> None:
        self._send = send
        self._changed = threading.Condition()
        self._pending: dict[str, dict[str, Any]] = {}
        self._sending: str | None = None
        self._thread: threading.Thread | None = None

    def post(self, task_id: str, progress: dict[str, Any]) -> None:
        with self._changed:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="progress-reporter",
                                                daemon=True)
                self._thread.start()
            self._pending[task_id] = progress
            self._changed.notify_all()

    def withdraw(self, task_id: str) -> None:
        with self._changed:
            self._pending.pop(task_id, None)
            while self._sending == task_id:
                self._changed.wait()

    def _run(self) -> None:
        while True:
            with self._changed:
                self._sending = None
                self._changed.notify_all()
                while not self._pending:
                    self._changed.wait()
                task_id = next(iter(self._pending))
                progress = self._pending.pop(task_id)
                self._sending = task_id
            try:
                self._send(task_id, progress)
            except Exception as exc:
                # Progress is for people watching; it must never cost a turn.
                log.debug("progress report for task %s failed: %s", task_id, exc)


class TurnProgress:
    def __init__(self, ids: TurnIds, *, reporter: ProgressReporter | None = None,
                 interval_seconds: float = 1.0) -> None:
        self.ids = ids
        self.started = time.monotonic()
        self.attempt: int | None = None
        self.run_id: str | None = None
        self._reporter = reporter
        self._interval = interval_seconds
        self._next_report = 0.0
        self._first_chunk_seen = False
        self._counted_in_flight = False

    def _ids(self) -> dict[str, Any]:
        return {"task_id": self.ids.task_id, "message_id": self.ids.message_id,
                "conversation_id": self.ids.conversation_id, "run_id": self.run_id,
                "attempt": self.attempt}

    def attempt_started(self, attempt: int) -> None:
        self.attempt = attempt
        self._counted_in_flight = True
        metrics.IN_FLIGHT.inc()

    def queued(self) -> None:
        log_stage("queued", **self._ids())

    def run_started(self, run_id: str, *, reattached: bool, seconds: float) -> None:
        self.run_id = run_id
        log_stage("run_created", reattached=reattached, create_ms=ms(seconds), **self._ids())

    def chunk(self, chunks: int, chars: int) -> None:
        now = time.monotonic()
        if not self._first_chunk_seen:
            self._first_chunk_seen = True
            ttfc = now - self.started
            metrics.TIME_TO_FIRST_CHUNK.observe(ttfc)
            log_stage("first_chunk", ttfc_ms=ms(ttfc), **self._ids())
        if self._reporter is not None and now >= self._next_report:
            self._next_report = now + self._interval
            self._reporter.post(self.ids.task_id, {
                "attempt": self.attempt, "run_id": self.run_id, "chunks": chunks,
                "chars": chars, "message_id": self.ids.message_id})

    def ended(self, outcome: str, *, chunks: int, chars: int) -> None:
        duration = time.monotonic() - self.started
        metrics.TURNS.labels(outcome).inc()
        metrics.TURN_DURATION.labels(outcome).observe(duration)
        metrics.CHUNKS.inc(chunks)
        log_stage("end", outcome=outcome, duration_ms=ms(duration), chunks=chunks, chars=chars,
                  **self._ids())
        self._leave()

    def failed(self, code: str, *, retrying: bool, delay: float | None = None,
               chunks: int = 0) -> None:
        duration = time.monotonic() - self.started
        metrics.CHUNKS.inc(chunks)
        if retrying:
            metrics.RETRIES.labels(code).inc()
            log_stage("retry", level=logging.WARNING, code=code, duration_ms=ms(duration),
                      delay_ms=ms(delay or 0), **self._ids())
        else:
            metrics.TURNS.labels("failed").inc()
            metrics.TURN_DURATION.labels("failed").observe(duration)
            log_stage("error", level=logging.ERROR, code=code, duration_ms=ms(duration),
                      **self._ids())
        self._leave()

    def _leave(self) -> None:
        if self._reporter is not None:
            self._reporter.withdraw(self.ids.task_id)
        if self._counted_in_flight:
            self._counted_in_flight = False
            metrics.IN_FLIGHT.dec()
