"""Stopping turns, deadlines and turn order, through the real worker unless noted."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from stub_backend import StubServer
from tests.conftest import (
    RunningWorker,
    StubControl,
    TurnListener,
    answer_of,
    assert_single_end,
    base_settings,
    make_turn,
    owner_ids,
    sqlite_url,
    wait_until,
)
from worker.backend import AgentBackendClient
from worker.client import stop_turn, submit_turn
from worker.errors import TurnTimedOut
from worker.locks import ConversationLocks, Lease
from worker.payload import parse_turn
from worker.supervisor import TurnControl, TurnSupervisor, stop_request
from worker.turn import TurnServices, run_turn

SLOW = {"answer_tokens": 200, "token_delay": 0.03}


def wait_for_chunks(listener: TurnListener, count: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while sum(event["event"] == "agent_message" for event in listener.events) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"fewer than {count} chunks in {timeout}s: {listener.events}")
        message = listener.pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
        if message is not None:
            listener.events.append(json.loads(message["data"]))


def assert_stopped_mid_answer(worker: RunningWorker, stub: StubControl, turn: dict[str, Any],
                              events: list[dict[str, Any]]) -> None:
    end = assert_single_end(events, "message_end")
    assert end["status"] == "stopped"
    streamed = answer_of(events[:-1])
    assert end["answer"] == streamed, "the partial answer is what the client saw"
    assert 0 < len(streamed) < 200 * 4, "stopped before the answer was complete"
    [run] = stub.runs(turn["message_id"])
    assert run["status"] == "cancelled", "the backend run must be cancelled, not paid to the end"
    message = worker.store.get_message(turn["message_id"])
    assert message is not None and (message.status, message.answer) == ("stopped", streamed)
    assert worker.store.get_snapshot(turn["conversation_id"]) is None


@pytest.mark.parametrize("by", ["message_id", "task_id"])
def test_stopping_a_running_turn_ends_it_with_the_partial_answer(
    by: str, celery_worker: RunningWorker, stub: StubControl, listen: Any, producer_app: Any
) -> None:
    turn = make_turn()
    stub.plan(turn["message_id"], **SLOW)
    listener = listen(turn["message_id"])
    submitted = submit_turn(turn, celery_app=producer_app, settings=celery_worker.settings)
    wait_for_chunks(listener, 2)

    stop_turn(**{by: getattr(submitted, by)}, **owner_ids(turn), celery_app=producer_app,
              settings=celery_worker.settings)
    events = listener.wait_for_end(timeout=5)

    assert_stopped_mid_answer(celery_worker, stub, turn, events)


def test_revoking_a_running_turn_from_celery_control_stops_it(
    celery_worker: RunningWorker, stub: StubControl, listen: Any, producer_app: Any
) -> None:
    turn = make_turn()
    stub.plan(turn["message_id"], **SLOW)
    listener = listen(turn["message_id"])
    submitted = submit_turn(turn, celery_app=producer_app, settings=celery_worker.settings)
    wait_for_chunks(listener, 2)

    producer_app.control.revoke(submitted.task_id)
    events = listener.wait_for_end(timeout=5)

    assert_stopped_mid_answer(celery_worker, stub, turn, events)


def test_stopping_a_waiting_turn_ends_it_without_calling_the_backend(
    celery_worker: RunningWorker, stub: StubControl, listen: Any, producer_app: Any
) -> None:
    waiting, first_listener, waiting_listener = _a_turn_waiting_behind_another(
        celery_worker, stub, listen, producer_app, answer_tokens=60, token_delay=0.03)

    stop_turn(message_id=waiting["message_id"], **owner_ids(waiting), celery_app=producer_app,
              settings=celery_worker.settings)

    end = assert_single_end(waiting_listener.wait_for_end(), "message_end")
    assert (end["status"], end["answer"]) == ("stopped", "")
    assert stub.create_calls(waiting["message_id"]) == 0
    assert assert_single_end(first_listener.wait_for_end(), "message_end")["status"] == "succeeded"
    message = celery_worker.store.get_message(waiting["message_id"])
    assert message is not None and message.status == "stopped"


def test_a_stop_from_another_owner_leaves_a_running_turn_to_finish(
    celery_worker: RunningWorker, stub: StubControl, listen: Any, producer_app: Any
) -> None:
    turn = make_turn()
    stub.plan(turn["message_id"], answer_tokens=60, token_delay=0.02)
    listener = listen(turn["message_id"])
    submitted = submit_turn(turn, celery_app=producer_app, settings=celery_worker.settings)
    wait_for_chunks(listener, 2)
    intruder = owner_ids(make_turn(tenant_id="tenant-2"))

    by_message = stop_turn(message_id=turn["message_id"], **intruder, celery_app=producer_app,
                           settings=celery_worker.settings)
    with pytest.raises(LookupError, match="no turn is known"):
        stop_turn(task_id=submitted.task_id, **intruder, celery_app=producer_app,
                  settings=celery_worker.settings)
    end = assert_single_end(listener.wait_for_end(timeout=10), "message_end")

    assert by_message.task_id is None, "another owner's task is never revoked"
    assert end["status"] == "succeeded"
    [run] = stub.runs(turn["message_id"])
    assert run["status"] == "succeeded"


def test_a_stop_from_another_owner_leaves_a_waiting_turn_to_run(
    celery_worker: RunningWorker, stub: StubControl, listen: Any, producer_app: Any
) -> None:
    waiting, _, waiting_listener = _a_turn_waiting_behind_another(
        celery_worker, stub, listen, producer_app, answer_tokens=30, token_delay=0.02)

    stop_turn(message_id=waiting["message_id"], **owner_ids(make_turn(user_id="user-2")),
              celery_app=producer_app, settings=celery_worker.settings)

    end = assert_single_end(waiting_listener.wait_for_end(), "message_end")
    assert (end["status"], end["answer"]) == ("succeeded", "[turn 2] You said: second.")
    assert stub.create_calls(waiting["message_id"]) == 1


def test_a_second_turn_waits_for_the_first_and_builds_on_its_snapshot(
    celery_worker: RunningWorker, stub: StubControl, listen: Any, producer_app: Any
) -> None:
    first = make_turn(query="first")
    second = make_turn(conversation_id=first["conversation_id"], query="second")
    stub.plan(first["message_id"], answer_tokens=30, token_delay=0.02)
    first_listener, second_listener = listen(first["message_id"]), listen(second["message_id"])

    submit_turn(first, celery_app=producer_app, settings=celery_worker.settings)
    wait_for_chunks(first_listener, 1)
    submit_turn(second, celery_app=producer_app, settings=celery_worker.settings)
    first_events = first_listener.wait_for_end()
    second_events = second_listener.wait_for_end()

    assert assert_single_end(second_events, "message_end")["answer"] == (
        "[turn 2] You said: second.")
    [first_run], [second_run] = stub.runs(first["message_id"]), stub.runs(second["message_id"])
    assert first_run["status"] == "succeeded"
    saved_after_first = second_run["request"]["session_snapshot"]
    history = next(layer for layer in saved_after_first["layers"] if layer["name"] == "history")
    assert history["runtime_state"]["messages"][-1]["content"] == first_events[-1]["answer"]
    message = celery_worker.store.get_message(second["message_id"])
    assert message is not None and message.attempts == 1, "waiting spends no attempt"


def test_a_stop_for_an_unknown_task_says_so(celery_worker: RunningWorker,
                                            producer_app: Any) -> None:
    with pytest.raises(LookupError, match="no turn is known"):
        stop_turn(task_id="no-such-task", **owner_ids(make_turn()), celery_app=producer_app,
                  settings=celery_worker.settings)


def _a_turn_waiting_behind_another(
    worker: RunningWorker, stub: StubControl, listen: Any, producer_app: Any, *,
    answer_tokens: int, token_delay: float,
) -> tuple[dict[str, Any], TurnListener, TurnListener]:
    """A first turn streaming and a second of its conversation queued behind it: the second,
    and a listener of each subscribed before it was enqueued."""
    first = make_turn(query="first")
    waiting = make_turn(conversation_id=first["conversation_id"], query="second")
    stub.plan(first["message_id"], answer_tokens=answer_tokens, token_delay=token_delay)
    first_listener = listen(first["message_id"])
    waiting_listener = listen(waiting["message_id"])
    submit_turn(first, celery_app=producer_app, settings=worker.settings)
    wait_for_chunks(first_listener, 1)
    submit_turn(waiting, celery_app=producer_app, settings=worker.settings)
    _wait_for_status(worker, waiting["message_id"], "queued")
    return waiting, first_listener, waiting_listener


def _wait_for_status(worker: RunningWorker, message_id: str, status: str) -> None:
    deadline = time.monotonic() + 10
    while True:
        message = worker.store.get_message(message_id)
        if message is not None and message.status == status:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"message {message_id} never became {status}")
        time.sleep(0.05)


# In-process: a short deadline -------------------------------------------------------------


@pytest.fixture
def short_deadline_services(stub_server: StubServer, tmp_path: Path) -> Iterator[TurnServices]:
    settings = base_settings(database_url=sqlite_url(tmp_path), backend_url=stub_server.url,
                             turn_deadline_seconds=0.5)
    services = TurnServices.from_settings(settings)
    yield services
    services.backend.close()
    services.store.engine.dispose()


def test_a_turn_past_its_deadline_is_cancelled_and_times_out(
    short_deadline_services: TurnServices, stub: StubControl,
    listen: Callable[[str], TurnListener],
) -> None:
    turn = make_turn()
    stub.plan(turn["message_id"], **SLOW)
    payload = parse_turn(turn, short_deadline_services.settings)
    started = time.monotonic()

    with pytest.raises(TurnTimedOut, match="deadline") as raised:
        run_turn(payload, task_id="task-1", services=short_deadline_services)

    assert time.monotonic() - started < 5, "the deadline must interrupt the blocked read"
    assert not raised.value.retryable
    [run] = stub.runs(turn["message_id"])
    assert raised.value.run_id == run["run_id"]
    wait_until(lambda: stub.runs(turn["message_id"])[0]["status"] == "cancelled")
    assert short_deadline_services.store.get_snapshot(turn["conversation_id"]) is None


# Control messages, in-process against real Redis ---------------------------------------------


def test_a_control_stop_is_obeyed_only_from_the_turns_owner(redis_client: redis.Redis) -> None:
    supervisor = _supervisor(redis_client, ConversationLocks(redis_client, ttl_seconds=30))
    control = supervisor.register("task-1", "msg-1", owner="owner-1", deadline_seconds=60)
    try:
        supervisor._on_control(stop_request("msg-1", "owner-2"))
        supervisor._on_control(json.dumps({"stop": "msg-1"}))
        supervisor._on_control(b"not json")
        assert not control.stopped

        supervisor._on_control(stop_request("msg-1", "owner-1"))
    finally:
        supervisor.close()

    assert control.stop_reason == "stopped"


# Lease renewal, in-process against real Redis -------------------------------------------------


class _EndingDuringRenewal(ConversationLocks):
    """Ends a turn (releases its lease, unregisters it) while the renewal's round trip is out,
    as a turn finishing at that moment does."""

    def __init__(self, *args: Any, ending: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._ending = ending

    def renew(self, leases: list[Lease]) -> list[Lease]:
        self._ending()
        return super().renew(leases)


def _supervisor(redis_client: redis.Redis, locks: ConversationLocks) -> TurnSupervisor:
    backend = AgentBackendClient("http://127.0.0.1:9")  # never called: no run is cancelled
    return TurnSupervisor(redis_client, backend, locks, lease_ttl_seconds=30)


def test_a_lease_released_by_a_turn_ending_during_renewal_is_not_reported_lost(
    redis_client: redis.Redis, caplog: pytest.LogCaptureFixture,
) -> None:
    supervisor: TurnSupervisor | None = None
    control: TurnControl | None = None

    def end_the_turn() -> None:
        assert supervisor is not None and control is not None and control.lease is not None
        locks.release(control.lease)
        supervisor.unregister(control)

    locks = _EndingDuringRenewal(redis_client, ttl_seconds=30, ending=end_the_turn)
    supervisor = _supervisor(redis_client, locks)
    control = supervisor.register("task-1", "msg-1", owner="owner-1", deadline_seconds=60)
    control.lease = locks.acquire("conv-1", "msg-1")

    try:
        with caplog.at_level(logging.WARNING, logger="worker.supervisor"):
            supervisor._renew_leases()
    finally:
        supervisor.close()

    assert "lapsed" not in caplog.text and "taken over" not in caplog.text
    assert redis_client.exists(ConversationLocks.key_for("conv-1")) == 0, (
        "an ended turn's lease is not taken again")


def test_a_lease_that_lapsed_unclaimed_is_taken_again_and_the_turn_goes_on(
    redis_client: redis.Redis, caplog: pytest.LogCaptureFixture,
) -> None:
    locks = ConversationLocks(redis_client, ttl_seconds=30)
    supervisor = _supervisor(redis_client, locks)
    control = supervisor.register("task-1", "msg-1", owner="owner-1", deadline_seconds=60)
    control.lease = locks.acquire(f"conv-{uuid.uuid4().hex[:8]}", "msg-1")
    assert control.lease is not None
    redis_client.delete(control.lease.key)  # expired while the worker was paused

    try:
        with caplog.at_level(logging.WARNING, logger="worker.supervisor"):
            supervisor._renew_leases()
    finally:
        supervisor.close()

    assert f"{control.lease.key} of turn msg-1 lapsed while it ran" in caplog.text
    assert redis_client.get(control.lease.key) == control.lease.token.encode()
    assert not control.stopped


def test_a_turn_whose_lease_another_holds_now_is_stopped_without_cancelling_its_run(
    redis_client: redis.Redis, caplog: pytest.LogCaptureFixture,
) -> None:
    locks = ConversationLocks(redis_client, ttl_seconds=30)
    supervisor = _supervisor(redis_client, locks)
    conversation = f"conv-{uuid.uuid4().hex[:8]}"
    control = supervisor.register("task-1", "msg-1", owner="owner-1", deadline_seconds=60)
    control.lease = locks.acquire(conversation, "msg-1")
    control.run_id = "run-that-goes-on"
    assert control.lease is not None
    redis_client.delete(control.lease.key)
    taken_over = locks.acquire(conversation, "msg-1")  # the worker that took the turn over

    try:
        with caplog.at_level(logging.WARNING, logger="worker.supervisor"):
            supervisor._renew_leases()
    finally:
        supervisor.close()

    assert taken_over is not None
    assert control.stop_reason == "taken_over"
    assert "turn msg-1 was taken over by another worker" in caplog.text
    assert redis_client.get(taken_over.key) == taken_over.token.encode()
    assert "could not cancel run" not in caplog.text, "the other worker follows that run"
