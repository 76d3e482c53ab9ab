"""The Celery application object: ``celery -A worker.app worker`` starts a turn worker."""

from __future__ import annotations

from typing import Any

from celery import Celery, bootsteps

from config.celery import celery_config
from config.settings import get_settings

app = Celery("agent_turn_worker", include=["worker.tasks"])
app.config_from_object(celery_config(get_settings()))


class UnbufferedTaskEvents(bootsteps.StartStopStep):
    """Send task events at once instead of through the dispatcher's group buffer.

    With an event loop (our threads pool) Celery buffers ``task-*`` events and flushes them from
    the loop, while pool threads append to the same buffer without its lock: events appended
    during a flush are dropped, and Flower shows finished turns as RECEIVED forever (celery
    issue 10434, seen here in tests/test_flower.py). Publishing directly takes the dispatcher's
    mutex, so every event gets through, at one Redis PUBLISH each.
    """

    requires = ("celery.worker.consumer.events:Events",)

    def start(self, parent: Any) -> None:
        dispatcher = getattr(parent, "event_dispatcher", None)
        if dispatcher is not None:
            dispatcher.flush()
            dispatcher.buffer_group = frozenset()


app.steps["consumer"].add(UnbufferedTaskEvents)
