"""The Celery configuration, derived from the typed settings so there is one source of truth.

Delivery is at least once: a turn's message is acknowledged only when the task finishes
(``acks_late``), and a worker that dies mid-turn hands it back (``reject_on_worker_lost``). The
broker's visibility timeout must stay above the longest turn, or Redis would hand a turn that is
still running to a second worker. The relation, checked by ``Settings``:

    turn deadline + longest retry delay  <  visibility timeout

and a killed worker's turns come back once the visibility timeout has passed, found by a sweep
every ``unacked_restore_interval_seconds`` of any live worker. A warm shutdown lets turns finish
(each within its deadline); a cold one hands unacknowledged turns back to the queue at once.
"""

from __future__ import annotations

import logging
import resource
from collections.abc import Mapping
from typing import Any

from celery.signals import worker_init

from config.settings import Settings

log = logging.getLogger(__name__)

TURN_TASK_NAME = "agent_turn.run_turn"
# The continuation of a turn after its user answered the question it asked (ask_human).
RESUME_TASK_NAME = "agent_turn.resume_turn"
# What Celery's events, and so Flower, show of a turn's arguments: ids and the query's start,
# never the whole query, the inputs or the agent settings (see turn_kwargsrepr).
TURN_ARGSREPR = "()"
QUERY_REPR_CHARS = 64
_TURN_REPR_FIELDS = ("message_id", "conversation_id", "tenant_id", "app_id", "user_id")
_REDIS_SCHEMES = frozenset({"redis", "rediss", "redis+socket", "sentinel"})


def turn_kwargsrepr(turn: Mapping[str, Any]) -> str:
    """The ``kwargsrepr`` of a turn task: its ids and the first 64 characters of its query."""
    shown: dict[str, Any] = {name: _cut(turn.get(name), 128) for name in _TURN_REPR_FIELDS}
    shown["query"] = _cut(turn.get("query"), QUERY_REPR_CHARS)
    return repr({"turn": shown})


def _cut(value: Any, limit: int) -> Any:
    """A raw payload's field as Flower may show it: ``repr`` escapes, this bounds."""
    if isinstance(value, str) and len(value) > limit:
        return value[:limit] + "…"
    return value if value is None or isinstance(value, str | int | float | bool) else "…"


def url_scheme(url: str) -> str:
    return url.partition("://")[0].lower()


def is_redis_url(url: str) -> bool:
    return url_scheme(url) in _REDIS_SCHEMES


def celery_config(settings: Settings) -> dict[str, Any]:
    config: dict[str, Any] = {
        "broker_url": settings.broker_url,
        "result_backend": settings.result_backend,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {
            "visibility_timeout": settings.visibility_timeout_seconds,
            "unacked_restore_interval": settings.unacked_restore_interval_seconds,
            "unacked_restore_throttle": 1,
            # kombu's Redis pool refuses, rather than waits, past this size, and every busy
            # slot of the pool acknowledges its turn on its own: below the concurrency, a burst
            # of acknowledgements reads as a lost broker connection and turns are redelivered.
            "max_connections": settings.worker_concurrency + 32,
        },
        # One result backend, so one Redis pool, per process: Celery otherwise builds a backend
        # with its own connections for every thread, and for every greenlet, i.e. every turn.
        "result_backend_thread_safe": True,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "task_default_queue": settings.queue,
        "task_routes": {TURN_TASK_NAME: {"queue": settings.queue},
                        RESUME_TASK_NAME: {"queue": settings.queue}},
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # No STARTED result write: it cost every turn a read and a write of the result backend
        # (two round trips, five commands) before its run could be created. Flower shows a turn
        # started from its task-started event; the backend state goes PENDING, then STREAMING
        # with progress at the first chunk (worker/progress.py), then the final state.
        "task_track_started": False,
        "task_send_sent_event": True,
        "worker_send_task_events": True,
        # Turns are long and I/O bound: a worker takes one message per free slot, so a busy
        # worker never sits on turns another could start.
        "worker_prefetch_multiplier": 1,
        # An I/O pool: a turn waits on the model nearly all its life. The Procfile runs gevent
        # (faster, docs/performance.md), which must be named on the command line (--pool
        # gevent): that is the only way Celery monkey-patches early enough. A worker started
        # without --pool gets threads, the other I/O pool the worker supports.
        "worker_pool": "threads",
        "worker_concurrency": settings.worker_concurrency,
        "result_expires": 24 * 3600,
        "worker_hijack_root_logger": False,
    }
    if url_scheme(settings.broker_url) == "redis":
        # kombu's Redis transport, keeping one client per channel (worker/broker.py).
        config["broker_transport"] = "worker.broker:Transport"
    if not is_redis_url(settings.broker_url):
        # The options above are Redis's. RabbitMQ needs no visibility timeout: it redelivers an
        # unacknowledged turn when its worker's connection closes, or when the turn outlives the
        # broker's consumer_timeout (docs/operations.md). Publisher confirms make send_task
        # return only once the broker has the turn.
        config["broker_transport_options"] = {"confirm_publish": True}
    return config


def open_files_needed(concurrency: int) -> int:
    """File descriptors a worker may hold: per turn its backend stream and, at worst, a Redis
    connection of the bus and one of the broker; plus a margin for everything else."""
    return 3 * concurrency + 256


@worker_init.connect
def _fit_process_to_concurrency(sender: Any = None, **_: Any) -> None:
    """Make the worker process able to hold its concurrency, before its pool starts.

    A thousand turns hold a few thousand sockets: the soft limit on open files (often 1024) is
    raised to what the concurrency needs, as far as the hard limit allows. The client pools are
    sized from the settings' concurrency, so a larger ``--concurrency`` is worth a warning.
    """
    if sender is not None and isinstance(sender.concurrency, int):
        raise_open_files_limit(open_files_needed(sender.concurrency))
        sized_for = sender.app.conf.worker_concurrency
        if isinstance(sized_for, int) and sender.concurrency > sized_for:
            log.warning("--concurrency %d is above AGENT_TURN_WORKER_CONCURRENCY (%d), which "
                        "sizes the Redis, HTTP and broker pools: set them alike",
                        sender.concurrency, sized_for)


def raise_open_files_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < needed:
        log.warning("open files limited to %d (hard limit); %d may be needed at this "
                    "concurrency", target, needed)
