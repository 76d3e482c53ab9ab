"""The Celery application's own steps, against a real worker: how its task events go out."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from typing import Any

import pytest

from tests.conftest import WORKER_POOL, RunningWorker, StubControl, make_turn
from worker.client import submit_turn

on_sqlite_worker = pytest.mark.parametrize("celery_worker", ["sqlite"], indirect=True)

TASK_EVENTS = ("task-received", "task-started", "task-succeeded")


class EventTap:
    """Celery's event receiver, also counting the messages that carried several events."""

    def __init__(self, app: Any) -> None:
        self.events: dict[str, list[str]] = defaultdict(list)
        self.batches = 0
        self._changed = threading.Condition()
        self._app = app
        self._receiver: Any = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> EventTap:
        self._thread.start()
        # Subscribed once anything arrives: the workers' heartbeats come every two seconds.
        with self._changed:
            deadline = time.monotonic() + 15
            while not self.events:
                left = deadline - time.monotonic()
                assert left > 0, "the event receiver heard nothing, not even a heartbeat"
                self._changed.wait(left)
        return self

    def __exit__(self, *_: Any) -> None:
        if self._receiver is not None:
            self._receiver.should_stop = True
        self._thread.join(timeout=10)

    def _run(self) -> None:
        def on_event(event: dict[str, Any]) -> None:
            with self._changed:
                self.events[event.get("uuid", "")].append(event["type"])
                self._changed.notify_all()

        with self._app.connection_for_read() as connection:
            receiver = self._app.events.Receiver(connection, handlers={"*": on_event})
            original = receiver._receive

            def counting(body: Any, message: Any) -> Any:
                if isinstance(body, list) and len(body) > 1:
                    self.batches += 1
                return original(body, message)

            receiver._receive = counting
            self._receiver = receiver
            # One consumer for the whole test: a consumer started again would miss what was
            # published while it resubscribed. It checks ``should_stop`` every quarter second.
            for _ in receiver.consume(limit=None, timeout=None, safety_interval=0.25):
                pass

    def wait_for(self, task_ids: list[str], kinds: tuple[str, ...], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._changed:
            while not all(set(kinds) <= set(self.events[task]) for task in task_ids):
                left = deadline - time.monotonic()
                missing = {task: sorted(set(kinds) - set(self.events[task]))
                           for task in task_ids if not set(kinds) <= set(self.events[task])}
                assert left > 0, f"task events never arrived: {missing}"
                self._changed.wait(left)


@on_sqlite_worker
def test_a_burst_of_turns_gets_every_task_event_through(
    celery_worker: RunningWorker, stub: StubControl, producer_app: Any
) -> None:
    turns = [make_turn() for _ in range(40)]
    for turn in turns:
        stub.plan(turn["message_id"], answer_tokens=3, token_delay=0.01)

    with EventTap(producer_app) as tap:
        task_ids = [submit_turn(turn, celery_app=producer_app,
                                settings=celery_worker.settings).task_id for turn in turns]
        tap.wait_for(task_ids, TASK_EVENTS, timeout=30)

    for task_id in task_ids:
        seen = tap.events[task_id]
        assert [seen.count(kind) for kind in TASK_EVENTS] == [1, 1, 1], seen
    if WORKER_POOL == "gevent":
        assert tap.batches > 0, "a green worker sends its task events together"
