"""What one turn attempt tells the outside world as it goes.

Three audiences, one object: the stage log (worker/logs.py), the Prometheus metrics
(worker/metrics.py), and Celery (a ``STREAMING`` task state with progress metadata that Flower
shows live). The turn calls it at each stage; the cost on the hot path, per delta, is a clock
read and a comparison.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from worker import metrics
from worker.logs import log_stage, ms
from worker.publisher import TurnIds

log = logging.getLogger(__name__)

ProgressReport = Callable[[dict[str, Any]], None]


class TurnProgress:
    def __init__(self, ids: TurnIds, *, report: ProgressReport | None = None,
                 interval_seconds: float = 1.0) -> None:
        self.ids = ids
        self.started = time.monotonic()
        self.attempt: int | None = None
        self.run_id: str | None = None
        self._report = report
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
        if self._report is not None and now >= self._next_report:
            self._next_report = now + self._interval
            self._send({"attempt": self.attempt, "run_id": self.run_id, "chunks": chunks,
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
        if self._counted_in_flight:
            self._counted_in_flight = False
            metrics.IN_FLIGHT.dec()

    def _send(self, progress: dict[str, Any]) -> None:
        try:
            self._report(progress)  # type: ignore[misc]
        except Exception as exc:
            # Progress is for people watching; it must never cost the turn.
            log.debug("progress report for %s failed: %s", self.ids.message_id, exc)
