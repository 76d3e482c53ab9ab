"""kombu's Redis transport with one Redis client per channel and unacked records written in
batches (worker/broker.py), on a real Redis."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator

import pytest
from celery import Celery
from kombu import Connection, Exchange, Queue
from kombu.message import Message

from config.celery import celery_config
from tests.conftest import BROKER_DB, REDIS_HOST, REDIS_PORT, base_settings
from worker.broker import Channel, QoS, Transport

BOUND_SECONDS = 5.0

BROKER_URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/{BROKER_DB}"


@pytest.fixture
def connection() -> Iterator[Connection]:
    with Connection(BROKER_URL, transport=Transport) as connection:
        yield connection


@pytest.fixture
def queue(connection: Connection) -> Iterator[Queue]:
    """A queue of this test's own, deleted after it."""
    name = f"broker-test-{uuid.uuid4().hex[:8]}"
    declared = Queue(name, Exchange(name), routing_key=name)
    yield declared
    declared(connection.default_channel).delete()


def _qos(connection: Connection) -> QoS:
    qos = connection.default_channel.qos
    assert isinstance(qos, QoS)
    return qos


def _publish(connection: Connection, queue: Queue, count: int) -> None:
    with connection.Producer() as producer:
        for number in range(count):
            producer.publish({"n": number}, exchange=queue.exchange, routing_key=queue.name,
                             declare=[queue], serializer="json")


def _receive(connection: Connection, queue: Queue, count: int,
             held: list[Message]) -> list[Message]:
    """Take ``count`` messages without acknowledging them; ``held`` collects every one
    received, for the clean-up."""
    received: list[Message] = []

    def on_message(_body: object, message: Message) -> None:
        received.append(message)
        held.append(message)

    with connection.Consumer(queue, accept=["json"], callbacks=[on_message]):
        while len(received) < count:
            connection.drain_events(timeout=5)
    return received


def _drop_records(channel: Channel, messages: list[Message]) -> None:
    """Leave no unacked record behind: the hash and index are shared by the database's users."""
    with channel.conn_or_acquire() as client:
        for message in messages:
            client.hdel(channel.unacked_key, message.delivery_tag)
            client.zrem(channel.unacked_index_key, message.delivery_tag)


def test_a_channel_sends_every_command_through_one_client(connection: Connection) -> None:
    channel = connection.default_channel
    assert isinstance(channel, Channel)

    with channel.conn_or_acquire() as first, channel.conn_or_acquire() as second:
        assert first is second
        assert first.ping() is True


def test_a_replaced_pool_gets_a_client_of_its_own(connection: Connection) -> None:
    channel = connection.default_channel
    with channel.conn_or_acquire() as before:
        pass
    channel._pool = None  # what kombu does when the channel's connection was lost

    with channel.conn_or_acquire() as after:
        assert after is not before and after.connection_pool is channel.pool
        assert after.ping() is True


def test_messages_and_acknowledgements_go_through_the_kept_client(
        connection: Connection, queue: Queue) -> None:
    _publish(connection, queue, 3)
    received: list[int] = []
    tags: list[str] = []

    def on_message(body: dict[str, int], message: Message) -> None:
        received.append(body["n"])
        tags.append(message.delivery_tag)
        message.ack()

    with connection.Consumer(queue, callbacks=[on_message], accept=["json"]):
        while len(received) < 3:
            connection.drain_events(timeout=5)

    assert received == [0, 1, 2]
    channel = connection.default_channel
    with channel.conn_or_acquire() as client:
        # The index is shared by the database's other users: only this test's tags count.
        assert [client.zscore(channel.unacked_index_key, tag) for tag in tags] == [None] * 3
        assert [client.hget(channel.unacked_key, tag) for tag in tags] == [None] * 3


def test_a_received_message_is_recorded_unacked_by_the_writer_and_restores_from_it(
        connection: Connection, queue: Queue) -> None:
    name = queue.name
    held: list[Message] = []
    try:
        _publish(connection, queue, 4)
        _receive(connection, queue, 4, held)
        channel = connection.default_channel
        qos = _qos(connection)
        for message in held:
            written = qos.written(message.delivery_tag)
            assert written is None or written.wait(5), "the writer records every message"

        with channel.conn_or_acquire() as client:
            for message in held:
                raw = client.hget(channel.unacked_key, message.delivery_tag)
                assert raw is not None
                body, exchange, routing_key = json.loads(raw)
                assert (body["properties"]["delivery_tag"], exchange, routing_key) == (
                    message.delivery_tag, name, name)
                assert client.zscore(channel.unacked_index_key, message.delivery_tag)
            held[0].ack()
            assert client.hget(channel.unacked_key, held[0].delivery_tag) is None

            qos.restore_unacked()  # what a shutdown does with what it still holds

            assert client.llen(name) == 3
            for message in held:
                assert client.hget(channel.unacked_key, message.delivery_tag) is None
    finally:
        _drop_records(connection.default_channel, held)


def test_records_still_queued_when_the_channel_closes_are_written_before_it_does(
        connection: Connection, queue: Queue) -> None:
    channel = connection.default_channel
    qos = _qos(connection)
    qos.restore_at_shutdown = False  # kombu then restores nothing: the records must be there
    stalled = threading.Event()
    records = qos._records
    records._writer = threading.Thread(target=stalled.wait, args=(BOUND_SECONDS,), daemon=True)
    records._writer.start()  # a writer that has not come round yet
    held: list[Message] = []
    try:
        _publish(connection, queue, 3)
        _receive(connection, queue, 3, held)
        assert len(records._pending) == 3
        stalled.set()

        qos.restore_unacked_once()

        with channel.conn_or_acquire() as client:
            for message in held:
                assert client.hexists(channel.unacked_key, message.delivery_tag), (
                    "a message taken off its queue with no record is lost if the process dies")
    finally:
        _drop_records(channel, held)


def test_the_record_writer_ends_with_its_channel_and_later_records_are_written_at_once(
        connection: Connection, queue: Queue) -> None:
    channel = connection.default_channel
    qos = _qos(connection)
    qos.restore_at_shutdown = False
    held: list[Message] = []
    try:
        _publish(connection, queue, 2)
        _receive(connection, queue, 1, held)
        writer = qos._records._writer
        assert writer is not None and writer.is_alive()

        qos.restore_unacked_once()
        writer.join(BOUND_SECONDS)
        assert not writer.is_alive(), "a writer left running outlives its channel"
        late = _receive(connection, queue, 1, held)  # one that arrives as the channel closes
        assert qos.written(late[0].delivery_tag) is None, "written at once: no writer to wait on"

        with channel.conn_or_acquire() as client:
            for message in held:
                assert client.hexists(channel.unacked_key, message.delivery_tag)
    finally:
        _drop_records(channel, held)


def test_only_a_plain_redis_broker_gets_the_transport() -> None:
    assert celery_config(base_settings())["broker_transport"] == "worker.broker:Transport"
    for url in ("rediss://127.0.0.1:6380/0", "amqp://guest:guest@127.0.0.1:5672//",
                "sentinel://127.0.0.1:26379"):
        assert "broker_transport" not in celery_config(base_settings(broker_url=url)), url


def test_a_celery_app_on_a_redis_url_connects_with_the_transport() -> None:
    app = Celery("broker-test", set_as_current=False)
    app.config_from_object(celery_config(base_settings()))
    with app.connection_for_write() as connection:
        assert isinstance(connection.transport, Transport)
        assert connection.default_channel.client.ping() is True
