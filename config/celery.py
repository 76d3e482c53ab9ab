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

from typing import Any

from config.settings import Settings

TURN_TASK_NAME = "agent_turn.run_turn"


def celery_config(settings: Settings) -> dict[str, Any]:
    return {
        "broker_url": settings.broker_url,
        "result_backend": settings.result_backend,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {
            "visibility_timeout": settings.visibility_timeout_seconds,
            "unacked_restore_interval": settings.unacked_restore_interval_seconds,
            "unacked_restore_throttle": 1,
        },
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "task_default_queue": settings.queue,
        "task_routes": {TURN_TASK_NAME: {"queue": settings.queue}},
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_track_started": True,
        "task_send_sent_event": True,
        "worker_send_task_events": True,
        # Turns are long and I/O bound: a worker takes one message per free slot, so a busy
        # worker never sits on turns another could start.
        "worker_prefetch_multiplier": 1,
        "worker_pool": "threads",
        "worker_concurrency": settings.worker_concurrency,
        "result_expires": 24 * 3600,
        "result_extended": True,
        "worker_hijack_root_logger": False,
    }
