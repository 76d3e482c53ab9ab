"""The Celery application object: ``celery -A worker.app worker`` starts a turn worker."""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from typing import Any

from celery import Celery, bootsteps
from celery.utils.collections import AttributeDict
from celery.worker.consumer import Consumer

from config.celery import TURN_TASK_NAME, celery_config, is_redis_url
from config.settings import get_settings
from worker.errors import InvalidTurnPayload
from worker.logs import excerpt, install_safe_log_records, log_stage

install_safe_log_records()

log = logging.getLogger(__name__)

# A header id worth recording a FAILURE under: what Celery and the producer helper make (UUIDs),
# and nothing that could name another key of the result backend.
_TASK_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")


class TurnConsumer(Consumer):
    """Celery's consumer, except that a message it cannot take is recorded, not just dropped.

    Celery logs a message whose body does not decode (not JSON, nested past the decoder's
    depth) or that is not a valid task message (``kwargs`` that are not a mapping) together
    with its whole body, at any size and with its line breaks, and acknowledges it: the task
    then stays ``PENDING`` forever and its producer never learns why. Here the message is
    still acknowledged (redelivering it cannot help), but with one bounded log line and the
    task marked ``FAILURE`` (``InvalidTurnPayload``) in the result backend, so that
    ``AsyncResult`` and Flower show what happened. No event reaches a turn's channel: a body
    that cannot be read has no message id anyone can trust.
    """

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Any:
        """Celery's handler, after a look at a turn's body: it must be ``[args, kwargs, …]``.

        Celery's tracer finds keyword arguments that are not a mapping only when it is about
        to call the task, and then merely warns. The body is decoded here once; kombu keeps
        the decoded payload on the message, and Celery's request reads that.
        """
        handle = super().create_task_handler(*args, **kwargs)

        def on_task_received(message: Any) -> Any:
            headers = message.headers
            if isinstance(headers, dict) and headers.get("task") == TURN_TASK_NAME:
                try:
                    body = message.payload
                except Exception as exc:
                    return self.on_decode_error(message, exc)
                if not (isinstance(body, list | tuple) and len(body) == 3
                        and isinstance(body[0], list | tuple) and isinstance(body[1], dict)
                        and isinstance(body[2], dict)):
                    self._refuse_unreadable(
                        message, "invalid task message: the body must be [args, kwargs, "
                                 "options] with a list, a mapping and a mapping")
                    message.ack()
                    return None
            return handle(message)

        return on_task_received

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        self._refuse_unreadable(message, f"the task message does not decode: {exc}")
        message.ack()

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        self._refuse_unreadable(message, f"invalid task message: {exc}")
        message.reject_log_error(log, self.connection_errors)

    def _refuse_unreadable(self, message: Any, reason: str) -> None:
        headers = message.headers if isinstance(message.headers, dict) else {}
        task_id, name = headers.get("id"), headers.get("task")
        usable_id = isinstance(task_id, str) and _TASK_ID.match(task_id) is not None
        log_stage("rejected", level=logging.WARNING, code=InvalidTurnPayload.code,
                  task_id=excerpt(task_id), task=excerpt(name), reason=excerpt(reason, 200))
        if not usable_id:
            return
        failure = InvalidTurnPayload(excerpt(reason, 200))
        request = AttributeDict(name=name, chord=None, root_id=headers.get("root_id"),
                                correlation_id=message.properties.get("correlation_id"),
                                reply_to=message.properties.get("reply_to"), errbacks=None,
                                ignore_result=False, group=None)
        try:
            self.app.backend.mark_as_failure(task_id, failure, request=request)
        except Exception:
            log.warning("could not record the failure of unreadable task %s", task_id,
                        exc_info=True)
        if self.event_dispatcher:
            self.event_dispatcher.send("task-failed", uuid=task_id,
                                       exception=repr(failure))


app = Celery("agent_turn_worker", include=["worker.tasks"])
app.config_from_object(celery_config(get_settings()))
app.conf.worker_consumer = "worker.app:TurnConsumer"


# How long a green worker's task events wait to go out together (TaskEventBatches).
EVENT_BATCH_SECONDS = 0.05

# The running consumer's task event dispatcher, while there is one.
_task_events: Any = None


def task_event_dispatcher() -> Any:
    """Where a task's own events go (None outside a running worker): the same dispatcher as
    Celery's task events, so that a turn's events reach Flower in the order they were sent."""
    return _task_events


class TaskEventBatches(bootsteps.StartStopStep):
    """Send a green worker's task events in batches, and any other pool's one by one.

    One by one, every ``task-*`` event is a Redis PUBLISH made by the greenlet that sent it,
    ~0.2 ms of CPU each and three per turn (received, started, succeeded), the first on the
    consumer's own path to the next message. On a gevent pool the events of all turns are
    gathered and sent every ``EVENT_BATCH_SECONDS`` as one message, a list, which Celery's
    event receivers (Flower's too) take apart.

    Celery's own buffer loses events: its flush sends the buffer, then clears it, and what was
    appended while the send waited on the socket is cleared unsent (celery issue 10434; with
    the threads pool, Flower showed finished turns as RECEIVED forever, tests/test_flower.py).
    Here a batch is taken out of the buffer before it is sent. That is safe where only I/O
    switches between sends (greenlets), not between threads, so threads publish each event
    directly under the dispatcher's mutex.
    """

    requires = ("celery.worker.consumer.events:Events",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._timer_entry: Any = None
        self._dispatcher: Any = None

    def start(self, parent: Any) -> None:
        global _task_events
        dispatcher = getattr(parent, "event_dispatcher", None)
        if dispatcher is None:
            return
        dispatcher.flush()
        _task_events = dispatcher
        if not getattr(getattr(parent, "pool", None), "is_green", False):
            dispatcher.buffer_group = frozenset()
            return
        self._dispatcher = dispatcher
        dispatcher.buffer_group = frozenset({"task"})
        # Never Celery's flush, which a full buffer would call from send().
        dispatcher.buffer_limit = 1_000_000
        dispatcher.flush = self.flush
        self._timer_entry = parent.timer.call_repeatedly(EVENT_BATCH_SECONDS, self.flush)

    def flush(self, errors: bool = True, groups: bool = True) -> None:
        dispatcher = self._dispatcher
        if dispatcher is None:
            return
        with dispatcher.mutex:
            if errors and dispatcher._outbound_buffer:
                failed = list(dispatcher._outbound_buffer)
                dispatcher._outbound_buffer.clear()
                for event, routing_key, _ in failed:
                    dispatcher._publish(event, dispatcher.producer, routing_key)
            if not groups:
                return
            batches, dispatcher._group_buffer = dispatcher._group_buffer, defaultdict(list)
            for group, events in batches.items():
                if events:
                    dispatcher._publish(events, dispatcher.producer, f"{group}.multi")

    def stop(self, parent: Any) -> None:
        global _task_events
        _task_events = None
        if self._timer_entry is not None:
            self._timer_entry.cancel()
            self._timer_entry = None
        try:
            self.flush()
        except Exception:  # the broker is gone: what is left is lost with the worker
            log.warning("sending the last task events failed", exc_info=True)
        self._dispatcher = None

    shutdown = stop


app.steps["consumer"].add(TaskEventBatches)


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
