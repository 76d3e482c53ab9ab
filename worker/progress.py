"""What one turn attempt tells the outside world as it goes.

Three audiences, one object: the stage log (worker/logs.py), the Prometheus metrics
(worker/metrics.py), and Celery (a ``STREAMING`` task state with progress metadata that Flower
shows live). The turn calls it at each stage; the cost on the hot path, per delta, is a clock
read and a comparison, and a progress report due is handed to the process's
``ProgressReporter`` rather than sent by the turn.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import redis
from celery import states

from worker import metrics
from worker.logs import log_stage, ms
from worker.publisher import TurnIds
from worker.writebehind import WriteBehind

log = logging.getLogger(__name__)

# Sends the progress of the turns whose reports are due: {task id: progress}.
ProgressSender = Callable[[dict[str, dict[str, Any]]], None]


class ProgressReporter:
    """Sends the running turns' progress reports for the whole process, in batches.

    Sent by the turn, a report cost it two Redis round trips (a result-backend write and a task
    event) between two of its events, ~0.7 ms of CPU, most of it building a Celery event
    dispatcher each time. Here the reports are written behind (worker/writebehind.py): one
    long-lived writer takes every report that is due at once and sends them together
    (``StreamingState``: one read and one write round trip for the batch, where each report
    alone cost two); a report not yet sent is replaced by its turn's newer one. A turn that
    ends withdraws its report, and waits for a batch that carries it, so that a late
    ``STREAMING`` never overwrites the task's final state.
    """

    def __init__(self, send: ProgressSender) -> None:
        self._sender = send
        self._reports: WriteBehind[dict[str, Any]] = WriteBehind(self._send,
                                                                 name="progress-reporter")
        self.batches = 0  # batches taken so far

    def post(self, task_id: str, progress: dict[str, Any]) -> None:
        self._reports.start()
        self._reports.put(task_id, progress)

    def withdraw(self, task_id: str) -> None:
        self._reports.withdraw(task_id)

    def _send(self, batch: dict[str, dict[str, Any]]) -> None:
        self.batches += 1
        try:
            self._sender(batch)
        except Exception as exc:
            # Progress is for people watching; it must never cost a turn.
            log.debug("progress reports for %d tasks failed: %s", len(batch), exc)


def store_progress(backend: Any, reports: dict[str, dict[str, Any]], state: str) -> None:
    """Write the ``state`` of many running tasks to Celery's result backend, with each one's
    progress as its ``info``.

    On a Redis backend that is two round trips for the lot: one ``MGET`` of what is stored,
    then one pipeline of the writes. ``Backend.store_result`` costs each report two (a ``GET``,
    then a ``MULTI``/``SETEX``/``PUBLISH``/``EXEC`` transaction): a turn's two or three reports
    were most of its round trips to the result backend. What is written is what
    ``store_result`` writes, the ``PUBLISH`` that ``AsyncResult.get(on_message=…)`` listens to
    included. As there, a task whose stored state is final is left alone: a report overtaken
    by its task's end must never turn it back into a running one (Celery guards ``SUCCESS``
    only; a failure or a revocation is as final). Another backend gets ``store_result`` per
    report.
    """
    client = getattr(backend, "client", None)
    if not isinstance(client, redis.Redis):
        for task_id, progress in reports.items():
            backend.store_result(task_id, progress, state)
        return
    keys = [backend.get_key_for_task(task_id) for task_id in reports]
    stored = client.mget(keys)
    with client.pipeline(transaction=False) as pipe:
        for key, current, (task_id, progress) in zip(keys, stored, reports.items(), strict=True):
            if current is not None and backend.decode(current).get("status") in states.READY_STATES:
                continue
            # Celery's own meta for a state (``store_result`` builds it the same way), so that
            # AsyncResult and Flower read it as they read any state.
            meta = backend._get_result_meta(result=progress, state=state, traceback=None,
                                            request=None)
            meta["task_id"] = task_id
            value = backend.encode(meta)
            if backend.expires:
                pipe.setex(key, backend.expires, value)
            else:
                pipe.set(key, value)
            pipe.publish(key, value)
        pipe.execute()


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
