"""The producer helper enqueues JSON only, validated, and returns the ids a caller needs."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
from celery import Celery

from config.celery import RESUME_TASK_NAME, TURN_TASK_NAME, celery_config
from config.settings import Settings
from tests.conftest import (
    BROKER_DB,
    REDIS_HOST,
    REDIS_PORT,
    base_settings,
    make_turn,
    owner_ids,
)
from worker.client import (
    prepare_turn,
    producer_app,
    stop_turn,
    submit_human_input,
    submit_human_input_for,
    submit_turn,
)
from worker.errors import AnswerTooLate, HumanInputRefused, InvalidTurnPayload
from worker.ownership import owner_fingerprint
from worker.publisher import EventBus
from worker.questions import PendingQuestion, answered_key, question_from_call


@pytest.fixture
def queue_settings() -> Settings:
    """A queue no worker consumes, so enqueued messages stay where the test can read them."""
    return base_settings(queue=f"client-test-{uuid.uuid4().hex[:8]}")


@pytest.fixture
def broker(queue_settings: Settings) -> Iterator[redis.Redis]:
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=BROKER_DB, socket_timeout=5)
    yield client
    client.delete(queue_settings.queue)
    client.close()


@pytest.fixture
def producer(queue_settings: Settings) -> Celery:
    app = Celery("client-test")
    app.config_from_object(celery_config(queue_settings))
    return app


def queued_messages(broker: redis.Redis, queue: str) -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in broker.lrange(queue, 0, -1)]


def test_submit_enqueues_the_turn_by_task_name_as_json_kwargs(
    producer: Celery, broker: redis.Redis, queue_settings: Settings
) -> None:
    turn = make_turn(query="hello there")

    submitted = submit_turn(turn, celery_app=producer, settings=queue_settings)

    [message] = queued_messages(broker, queue_settings.queue)
    assert message["headers"]["task"] == TURN_TASK_NAME
    assert message["headers"]["id"] == submitted.task_id
    assert message["content-type"] == "application/json"
    args, kwargs, _ = json.loads(base64.b64decode(message["body"]))
    assert args == []
    assert set(kwargs) == {"turn"}
    assert kwargs["turn"]["query"] == "hello there"
    assert kwargs["turn"]["message_id"] == turn["message_id"]


def test_submit_returns_ids_and_the_channel_to_listen_on(
    producer: Celery, broker: redis.Redis, queue_settings: Settings
) -> None:
    turn = make_turn()

    submitted = submit_turn(turn, celery_app=producer, settings=queue_settings)

    assert submitted.message_id == turn["message_id"]
    assert submitted.conversation_id == turn["conversation_id"]
    assert submitted.channel == f"agent-turn:events:{turn['message_id']}"
    assert submitted.task_id


def test_submit_gives_a_new_turn_fresh_message_and_conversation_ids(
    producer: Celery, broker: redis.Redis, queue_settings: Settings
) -> None:
    fields = {"tenant_id": "t", "app_id": "a", "user_id": "u", "query": "hi"}

    first = submit_turn(fields, celery_app=producer, settings=queue_settings)
    second = submit_turn(fields, celery_app=producer, settings=queue_settings)

    assert first.message_id != second.message_id
    assert first.conversation_id != second.conversation_id
    uuid.UUID(first.message_id)


@pytest.mark.parametrize("bad", [
    {"query": ""},
    {"query": "x" * 40_000},
    {"surprise": 1},
    {"message_id": "has space"},
    {"agent": {"model": "gpt-4o", "credentials": {"api_key": "k"}}},
])
def test_invalid_turn_raises_and_enqueues_nothing(
    bad: dict[str, Any], producer: Celery, broker: redis.Redis, queue_settings: Settings
) -> None:
    with pytest.raises(InvalidTurnPayload):
        submit_turn(make_turn(**bad), celery_app=producer, settings=queue_settings)

    assert broker.llen(queue_settings.queue) == 0


def test_prepared_turn_can_be_subscribed_to_before_it_is_enqueued(
    queue_settings: Settings,
) -> None:
    prepared = prepare_turn({"tenant_id": "t", "app_id": "a", "user_id": "u", "query": "hi"},
                            queue_settings)

    assert queue_settings.channel_for(prepared.message_id).endswith(prepared.message_id)
    assert prepared.conversation_id


# Answers to a question ------------------------------------------------------------------------

OWNER_IDS = {"tenant_id": "tenant-1", "app_id": "app-1", "user_id": "user-1"}
OWNER = owner_fingerprint(*OWNER_IDS.values())


def ask(bus: EventBus, *, expires_in: float = 600.0,
        record: dict[str, Any] | None = None) -> str:
    """A message waiting for an answer, recorded as the worker records it; its message id."""
    message_id = f"msg-{uuid.uuid4().hex[:12]}"
    question: PendingQuestion = question_from_call(
        {"tool_call_id": "call_1", "tool_name": "ask_human",
         "args": {"question": "Ship it?", "fields": [{"name": "note"}],
                  "actions": [{"id": "approve", "label": "Approve"}]}},
        run_id="run-1", message_id=message_id)
    expires_at = datetime.now(UTC) + timedelta(seconds=expires_in)
    bus.record_owner(message_id, OWNER)
    bus.record_question(message_id, record or question.record(expires_at, **OWNER_IDS),
                        ttl_seconds=600)
    return message_id


def queued_answers(broker: redis.Redis, queue: str) -> list[dict[str, Any]]:
    answers = []
    for message in queued_messages(broker, queue):
        assert message["headers"]["task"] == RESUME_TASK_NAME
        _, kwargs, _ = json.loads(base64.b64decode(message["body"]))
        answers.append(kwargs["answer"])
    return answers


def test_an_answer_for_an_owner_known_by_fingerprint_is_enqueued_under_the_owners_ids(
    producer: Celery, broker: redis.Redis, queue_settings: Settings, event_bus: EventBus,
) -> None:
    message_id = ask(event_bus)

    task_id = submit_human_input_for(message_id, "call_1", "approve", {"note": "go"},
                                     owner=OWNER, celery_app=producer, settings=queue_settings)

    [answer] = queued_answers(broker, queue_settings.queue)
    assert task_id
    assert answer == {**OWNER_IDS, "schema_version": 1, "message_id": message_id,
                      "tool_call_id": "call_1", "action": "approve", "values": {"note": "go"}}


@pytest.mark.parametrize("record", [
    None,  # the record is right, the fingerprint is another owner's
    {"tool_call_id": "call_1", "tool_name": "ask_human", "args": {}},  # no owner's ids
    {"tool_call_id": "call_1", "tool_name": "ask_human", "args": {},
     "owner": {"tenant_id": "tenant-2", "app_id": "app-1", "user_id": "user-1"}},
])
def test_an_answer_by_fingerprint_that_the_record_does_not_name_is_refused_and_not_enqueued(
    record: dict[str, Any] | None, producer: Celery, broker: redis.Redis,
    queue_settings: Settings, event_bus: EventBus,
) -> None:
    message_id = ask(event_bus, record=record)
    owner = owner_fingerprint("tenant-2", "app-1", "user-1") if record is None else OWNER

    with pytest.raises(HumanInputRefused) as refused:
        submit_human_input_for(message_id, "call_1", "submit", {}, owner=owner,
                               celery_app=producer, settings=queue_settings)

    assert "not waiting for an answer" in refused.value.message
    assert broker.llen(queue_settings.queue) == 0
    assert not event_bus.redis.exists(answered_key(message_id, "call_1"))


@pytest.mark.parametrize(("fields", "reason"), [
    ({"action": 5}, "action"),
    ({"values": "yes"}, "values"),
    ({"values": {"note": "x" * 20_000}}, "more than"),
    ({"tool_call_id": ""}, "tool_call_id"),
])
def test_an_answer_by_fingerprint_of_the_wrong_shape_is_invalid_and_not_enqueued(
    fields: dict[str, Any], reason: str, producer: Celery, broker: redis.Redis,
    queue_settings: Settings, event_bus: EventBus,
) -> None:
    message_id = ask(event_bus)
    answer: dict[str, Any] = {"tool_call_id": "call_1", "action": "approve", "values": {}}
    answer.update(fields)

    with pytest.raises(InvalidTurnPayload) as invalid:
        submit_human_input_for(message_id, **answer, owner=OWNER, celery_app=producer,
                               settings=queue_settings)

    assert reason in invalid.value.message
    assert broker.llen(queue_settings.queue) == 0


def test_an_answer_past_the_questions_expiry_is_refused_as_too_late(
    producer: Celery, broker: redis.Redis, queue_settings: Settings, event_bus: EventBus,
) -> None:
    message_id = ask(event_bus, expires_in=-1)

    with pytest.raises(AnswerTooLate) as by_ids:
        submit_human_input(message_id, "call_1", "approve", {}, **OWNER_IDS,
                           celery_app=producer, settings=queue_settings)
    with pytest.raises(AnswerTooLate) as by_fingerprint:
        submit_human_input_for(message_id, "call_1", "approve", {}, owner=OWNER,
                               celery_app=producer, settings=queue_settings)

    assert isinstance(by_ids.value, HumanInputRefused), "callers catching refusals catch it"
    assert (by_fingerprint.value.status, by_fingerprint.value.code) == (
        410, "human_input_expired")
    assert broker.llen(queue_settings.queue) == 0


def test_an_answer_that_could_not_be_enqueued_can_be_sent_again(
    producer: Celery, broker: redis.Redis, queue_settings: Settings, event_bus: EventBus,
) -> None:
    from kombu.exceptions import OperationalError

    message_id = ask(event_bus)
    no_broker = producer_app(base_settings(broker_url="redis://127.0.0.1:1/0",
                                           queue=queue_settings.queue))

    with pytest.raises(OperationalError):
        submit_human_input(message_id, "call_1", "approve", {}, **OWNER_IDS,
                           celery_app=no_broker, settings=queue_settings)
    submit_human_input(message_id, "call_1", "approve", {}, **OWNER_IDS,
                       celery_app=producer, settings=queue_settings)

    assert len(queued_answers(broker, queue_settings.queue)) == 1
    with pytest.raises(HumanInputRefused, match="answered already"):
        submit_human_input(message_id, "call_1", "approve", {}, **OWNER_IDS,
                           celery_app=producer, settings=queue_settings)


def test_a_stop_names_its_task_only_for_the_tasks_owner(
    producer: Celery, queue_settings: Settings, broker: redis.Redis
) -> None:
    turn = make_turn()
    sent = submit_turn(turn, celery_app=producer, settings=queue_settings)
    owner = owner_ids(turn)
    other = {**owner, "app_id": "app-2"}

    mine = stop_turn(message_id=sent.message_id, **owner, celery_app=producer,
                     settings=queue_settings)
    theirs = stop_turn(message_id=sent.message_id, **other, celery_app=producer,
                       settings=queue_settings)
    with pytest.raises(LookupError, match="no turn is known"):
        stop_turn(task_id=sent.task_id, **other, celery_app=producer, settings=queue_settings)

    assert (mine.task_id, mine.message_id) == (sent.task_id, sent.message_id)
    assert (theirs.task_id, theirs.message_id) == (None, sent.message_id), (
        "another owner's stop looks like a stop of an unknown message")


@pytest.mark.parametrize("bad", [{"user_id": ""}, {"tenant_id": "a b"}, {"message_id": "x\n"},
                                 {"app_id": None}])
def test_a_stop_with_an_invalid_id_is_refused_before_anything_is_sent(
    producer: Celery, queue_settings: Settings, bad: dict[str, Any]
) -> None:
    fields = {"tenant_id": "tenant-1", "app_id": "app-1", "user_id": "user-1",
              "message_id": "msg-1", **bad}

    with pytest.raises(ValueError, match="not a valid id"):
        stop_turn(**fields, celery_app=producer, settings=queue_settings)
