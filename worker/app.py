"""The Celery application object: ``celery -A worker.app worker`` starts a turn worker."""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, bootsteps

from config.celery import celery_config, is_redis_url
from config.settings import get_settings

log = logging.getLogger(__name__)

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


class RestoreUnacknowledgedTurns(bootsteps.StartStopStep):
    """Hand a dead worker's turns back to the queue under a green pool too.

    With a Redis broker, kombu keeps each delivered turn in an "unacked" index until it is
    acknowledged, and puts those older than the visibility timeout back on the queue. It does
    so from the event loop's timer, which only the threads and prefork pools run. A gevent
    worker consumes with ``drain_events`` instead, and there kombu restores only after a poll
    that returned nothing, which an idle queue's BRPOP time-out never is: a gevent worker never
    brought back the turns of a worker that was killed (tests/test_faults.py). This step runs
    the same restore on the worker's timer. It takes kombu's restore mutex, so any number of
    workers can run it.
    """

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._timer_entry: Any = None

    def start(self, parent: Any) -> None:
        pool = getattr(parent, "pool", None)
        if not getattr(pool, "is_green", False) or not is_redis_url(app.conf.broker_url):
            return
        interval = get_settings().unacked_restore_interval_seconds
        channel = parent.connection.default_channel

        def restore() -> None:
            try:
                channel.qos.restore_visible(num=channel.unacked_restore_limit, interval=1)
            except Exception:  # the consumer's own loop reconnects; try again next tick
                log.warning("restoring unacknowledged turns failed", exc_info=True)

        self._timer_entry = parent.timer.call_repeatedly(interval, restore)

    def stop(self, parent: Any) -> None:
        if self._timer_entry is not None:
            self._timer_entry.cancel()
            self._timer_entry = None


app.steps["consumer"].add(RestoreUnacknowledgedTurns)
