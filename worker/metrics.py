"""Prometheus metrics of the turns a worker process runs.

Exposed on ``AGENT_TURN_METRICS_PORT`` (0 turns the endpoint off) by the worker process; with the
default threads pool every turn runs in that one process, so the plain registry is complete.
(A prefork pool would need prometheus_client's multiprocess mode.) Flower's own ``/metrics``
adds the Celery-level view: tasks by state, queue latency.
"""

from __future__ import annotations

import logging
import threading

from prometheus_client import Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

TURNS = Counter("agent_turn_turns_total", "Turns ended, by outcome.", ["outcome"])
TURN_DURATION = Histogram(
    "agent_turn_duration_seconds", "Wall time of a turn attempt, by outcome.", ["outcome"],
    buckets=(0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600),
)
TIME_TO_FIRST_CHUNK = Histogram(
    "agent_turn_time_to_first_chunk_seconds",
    "From the attempt's start to its first chunk on the channel.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30),
)
RETRIES = Counter("agent_turn_retries_total", "Attempts that failed and were retried, by code.",
                  ["code"])
IN_FLIGHT = Gauge("agent_turn_in_flight", "Turn attempts running now.")
TAKEOVERS = Counter("agent_turn_takeovers_total",
                    "Task messages of dead workers handed on by this one, by whether the turn "
                    "was running or still queued.", ["kind"])
CHUNKS = Counter("agent_turn_chunks_published_total", "agent_message events published.")

_started = threading.Lock()
_port: int | None = None


def serve(port: int, host: str) -> None:
    """Start the scrape endpoint once per process."""
    global _port
    with _started:
        if _port is not None or port <= 0:
            return
        try:
            start_http_server(port, addr=host)
        except OSError as exc:
            # A busy port must not keep turns from running; the operator sees why.
            log.error("metrics endpoint not started on %s:%d: %s", host, port, exc)
            return
        _port = port
        log.info("metrics on http://%s:%d/metrics", host, port)
