"""The producer helper enqueues JSON only, validated, and returns the ids a caller needs."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery

from config.celery import TURN_TASK_NAME, celery_config
from config.settings import Settings
from tests.conftest import BROKER_DB, REDIS_HOST, REDIS_PORT, base_settings, make_turn
from worker.client import prepare_turn, submit_turn
from worker.errors import InvalidTurnPayload


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
