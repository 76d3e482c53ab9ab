"""Turns that name another owner's conversation or message, through a real worker.

A conversation belongs to the (tenant, app, user) of its first turn and a message to its
conversation and owner (worker/ownership.py, ``SessionStore.claim``). A web tier that passes a
user's ids through must not turn that into a leak: each case here is refused before anything
of the other owner's is read or written, with one ``error`` on the refused sender's own stream,
and the rightful owner's turn streams exactly as if nothing had happened.
"""

from __future__ import annotations

import json
from typing import Any

import redis

from tests.conftest import (
    RunningWorker,
    StubControl,
    TurnListener,
    answer_of,
    assert_single_end,
    make_turn,
    send_raw_and_wait,
    submit_and_wait,
)
from worker.ownership import owner_fingerprint, owner_key, refusal_stream

SECRET = "my secret is 4242"
OTHER_OWNER = {"tenant_id": "tenant-2", "app_id": "app-1", "user_id": "user-1"}


def _refusal_of(turn: dict[str, Any]) -> str:
    return refusal_stream(turn["message_id"], owner_fingerprint(
        turn["tenant_id"], turn["app_id"], turn["user_id"]))


def _refused(turn: dict[str, Any], listen: Any, producer_app: Any,
             worker: RunningWorker) -> dict[str, Any]:
    """Send a turn as a careless web tier would; return the one error on its refusal stream."""
    listener = listen(_refusal_of(turn))
    _, _ = send_raw_and_wait({"turn": turn}, None, listen, producer_app, worker)
    error = assert_single_end(listener.wait_for_end(), "error")
    assert (error["code"], error["status"]) == ("conversation_not_found", 404)
    assert error["message_id"] == turn["message_id"]
    assert SECRET not in json.dumps(error)
    return error


def _quiet(listener: TurnListener, seconds: float = 0.5) -> list[dict[str, Any]]:
    listener.drain_quietly(seconds)
    return listener.events


def test_a_turn_naming_another_owners_conversation_sees_none_of_its_history(
    celery_worker: RunningWorker, stub: StubControl, listen: Any, producer_app: Any,
    redis_client: redis.Redis
) -> None:
    owners = make_turn(query=SECRET)
    submit_and_wait(owners, listen, producer_app, celery_worker)
    intruder = make_turn(conversation_id=owners["conversation_id"], query="what is my secret?",
                         **OTHER_OWNER)
    intruders_channel = listen(intruder["message_id"])

    _refused(intruder, listen, producer_app, celery_worker)

    assert _quiet(intruders_channel) == [], "nothing on the message's own channel"
    assert stub.create_calls(intruder["message_id"]) == 0, "no run, so no history sent"
    assert celery_worker.store.get_message(intruder["message_id"]) is None
    snapshot = celery_worker.store.get_snapshot(owners["conversation_id"])
    assert snapshot is not None and snapshot.version == 1
    assert [m.message_id for m in celery_worker.store.list_messages(owners["conversation_id"])] \
        == [owners["message_id"]]
    assert redis_client.get(owner_key(owners["message_id"])).decode() == owner_fingerprint(
        owners["tenant_id"], owners["app_id"], owners["user_id"])
    assert redis_client.get(owner_key(intruder["message_id"])) is None


def test_another_owners_finished_message_id_is_not_replayed_to_it(
    celery_worker: RunningWorker, stub: StubControl, listen: Any, producer_app: Any
) -> None:
    owners = make_turn(query=SECRET)
    owners_end = submit_and_wait(owners, listen, producer_app, celery_worker)[-1]
    owners_channel = listen(owners["message_id"])
    intruder = make_turn(message_id=owners["message_id"], query="replay it", **OTHER_OWNER)

    error = _refused(intruder, listen, producer_app, celery_worker)

    assert owners_end["answer"] not in json.dumps(error)
    assert _quiet(owners_channel) == [], "the owner's channel gets no second end"
    assert celery_worker.store.get_message(owners["message_id"]).status == "succeeded"
    assert stub.create_calls(owners["message_id"]) == 1


def test_another_owners_running_message_id_does_not_join_its_stream(
    celery_worker: RunningWorker, stub: StubControl, listen: Any, producer_app: Any
) -> None:
    owners = make_turn(query=SECRET)
    stub.plan(owners["message_id"], answer_tokens=30, token_delay=0.03)
    owners_channel = listen(owners["message_id"])
    from worker.client import submit_turn

    submit_turn(owners, celery_app=producer_app, settings=celery_worker.settings)
    assert owners_channel.wait_for("agent_message")["event"] == "agent_message"
    intruder = make_turn(message_id=owners["message_id"], **OTHER_OWNER)

    _refused(intruder, listen, producer_app, celery_worker)

    events = owners_channel.wait_for_end()
    end = assert_single_end(events, "message_end")
    assert answer_of(events) == end["answer"], "every delta once"
    assert {event["task_id"] for event in events} == {events[0]["task_id"]}
    assert stub.create_calls(owners["message_id"]) == 1


def test_the_same_message_id_in_another_conversation_of_its_owner_is_refused(
    celery_worker: RunningWorker, listen: Any, producer_app: Any
) -> None:
    first = make_turn()
    submit_and_wait(first, listen, producer_app, celery_worker)

    _refused(make_turn(message_id=first["message_id"]), listen, producer_app, celery_worker)

    assert celery_worker.store.get_message(first["message_id"]).conversation_id == \
        first["conversation_id"]


def test_an_invalid_payload_naming_another_owners_message_errs_on_its_own_stream(
    celery_worker: RunningWorker, listen: Any, producer_app: Any
) -> None:
    owners = make_turn(query=SECRET)
    submit_and_wait(owners, listen, producer_app, celery_worker)
    owners_channel = listen(owners["message_id"])
    intruder = make_turn(message_id=owners["message_id"], query="", **OTHER_OWNER)
    listener = listen(_refusal_of(intruder))

    send_raw_and_wait({"turn": intruder}, None, listen, producer_app, celery_worker)

    error = assert_single_end(listener.wait_for_end(), "error")
    assert error["code"] == "invalid_param"
    assert _quiet(owners_channel) == []


def test_the_owner_still_runs_turns_in_its_conversation_after_a_refusal(
    celery_worker: RunningWorker, listen: Any, producer_app: Any
) -> None:
    owners = make_turn(query=SECRET)
    submit_and_wait(owners, listen, producer_app, celery_worker)
    _refused(make_turn(conversation_id=owners["conversation_id"], **OTHER_OWNER), listen,
             producer_app, celery_worker)

    follow_up = make_turn(conversation_id=owners["conversation_id"], query="and now?")
    end = assert_single_end(submit_and_wait(follow_up, listen, producer_app, celery_worker),
                            "message_end")

    assert end["answer"] == "[turn 2] You said: and now?."
    assert celery_worker.store.get_snapshot(owners["conversation_id"]).version == 2
