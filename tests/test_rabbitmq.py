"""A worker with RabbitMQ as its broker, Redis kept as the pub/sub bus and result backend.

The real RabbitMQ on 127.0.0.1:5672 (started by scripts/ensure-services when it is down), a queue
of this run's own, deleted afterwards, and a real worker process.
"""

from __future__ import annotations

import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from celery import Celery
from kombu import Connection

from config.celery import celery_config
from config.settings import Settings
from stub_backend import StubServer
from tests.conftest import (
    ROOT,
    RunningWorker,
    StubControl,
    answer_of,
    assert_single_end,
    base_settings,
    final_state,
    make_turn,
    owner_ids,
    sqlite_url,
    start_worker,
    stop_worker,
)
from tests.test_supervisor import SLOW, wait_for_chunks
from worker.client import stop_turn, submit_turn
from worker.store import SessionStore, make_engine

RABBITMQ_HOST, RABBITMQ_PORT = "127.0.0.1", 5672
RABBITMQ_URL = f"amqp://guest:guest@{RABBITMQ_HOST}:{RABBITMQ_PORT}//"


def ensure_rabbitmq(wait_seconds: float = 30.0) -> None:
    """RabbitMQ accepting logins, started by scripts/ensure-services if it is down."""
    try:
        socket.create_connection((RABBITMQ_HOST, RABBITMQ_PORT), timeout=1).close()
    except OSError:
        result = subprocess.run([str(ROOT / "scripts" / "ensure-services"), "rabbitmq"],
                                capture_output=True, text=True, timeout=90)
        if result.returncode != 0:
            pytest.fail(f"RabbitMQ is not reachable on {RABBITMQ_HOST}:{RABBITMQ_PORT} and "
                        f"scripts/ensure-services could not start it:\n{result.stderr.strip()}",
                        pytrace=False)
    deadline = time.monotonic() + wait_seconds
    while True:  # the port opens a moment before the broker takes logins
        try:
            with Connection(RABBITMQ_URL, connect_timeout=2) as connection:
                connection.ensure_connection(max_retries=0)
            return
        except Exception as exc:
            if time.monotonic() > deadline:
                pytest.fail(f"RabbitMQ on {RABBITMQ_HOST}:{RABBITMQ_PORT} refuses guest/guest "
                            f"logins: {exc}", pytrace=False)
            time.sleep(0.5)


@dataclass
class RabbitWorker:
    worker: RunningWorker
    producer: Celery

    @property
    def settings(self) -> Settings:
        return self.worker.settings


@pytest.fixture(scope="module")
def rabbit(stub_server: StubServer,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitWorker]:
    ensure_rabbitmq()
    directory = tmp_path_factory.mktemp("worker-rabbitmq")
    queue = f"agent_turns_rabbitmq_test_{uuid.uuid4().hex[:8]}"
    settings = base_settings(broker_url=RABBITMQ_URL, queue=queue,
                             database_url=sqlite_url(directory), backend_url=stub_server.url)
    log_path = directory / "worker.log"
    process = start_worker(settings, log_path, f"test-rabbitmq-{uuid.uuid4().hex[:6]}@%h")
    engine = make_engine(settings.database_url, pool_size=2)
    producer = Celery("test-producer-rabbitmq")
    producer.config_from_object(celery_config(settings))
    try:
        yield RabbitWorker(RunningWorker(process, settings, log_path, SessionStore(engine)),
                           producer)
    finally:
        stop_worker(process)
        engine.dispose()
        producer.close()
        with Connection(RABBITMQ_URL, connect_timeout=5) as connection:
            channel = connection.default_channel
            channel.queue_delete(queue)
            channel.exchange_delete(queue)


def test_the_configuration_sets_redis_transport_options_only_for_redis() -> None:
    amqp = celery_config(base_settings(broker_url=RABBITMQ_URL))
    assert "visibility_timeout" not in amqp["broker_transport_options"]
    assert amqp["broker_transport_options"]["confirm_publish"] is True
    on_redis = celery_config(base_settings())
    assert on_redis["broker_transport_options"]["visibility_timeout"] == \
        base_settings().visibility_timeout_seconds


def test_a_turn_streams_to_its_end_with_rabbitmq_as_broker(
    rabbit: RabbitWorker, stub: StubControl, listen: Any
) -> None:
    assert "transport:   amqp://guest:**@127.0.0.1:5672//" in rabbit.worker.log_tail(200)
    turn = make_turn(query="hello rabbit")
    stub.plan(turn["message_id"], answer_tokens=12)
    listener = listen(turn["message_id"])

    sent = submit_turn(turn, celery_app=rabbit.producer, settings=rabbit.settings)
    events = listener.wait_for_end()

    end = assert_single_end(events, "message_end")
    assert end["status"] == "succeeded" and end["answer"] == answer_of(events[:-1]) != ""
    assert final_state(rabbit.producer.AsyncResult(sent.task_id)) == "SUCCESS"
    message = rabbit.worker.store.get_message(turn["message_id"])
    assert message is not None and (message.status, message.answer) == ("succeeded",
                                                                          end["answer"])


@pytest.mark.parametrize("how", ["stop_turn", "revoke"])
def test_a_running_turn_stops_with_rabbitmq_as_broker(
    how: str, rabbit: RabbitWorker, stub: StubControl, listen: Any
) -> None:
    turn = make_turn()
    stub.plan(turn["message_id"], **SLOW)
    listener = listen(turn["message_id"])
    sent = submit_turn(turn, celery_app=rabbit.producer, settings=rabbit.settings)
    wait_for_chunks(listener, 2)

    if how == "stop_turn":
        stop_turn(task_id=sent.task_id, **owner_ids(turn), celery_app=rabbit.producer,
                  settings=rabbit.settings)
    else:  # Celery's revoke alone, broadcast through RabbitMQ (what Flower sends)
        rabbit.producer.control.revoke(sent.task_id)
    events = listener.wait_for_end(timeout=5)

    end = assert_single_end(events, "message_end")
    assert end["status"] == "stopped"
    assert end["answer"] == answer_of(events[:-1]) != ""
    [run] = stub.runs(turn["message_id"])
    assert run["status"] == "cancelled"


def test_a_second_turn_waits_for_the_first_with_rabbitmq_as_broker(
    rabbit: RabbitWorker, stub: StubControl, listen: Any
) -> None:
    first = make_turn(query="first")
    second = make_turn(conversation_id=first["conversation_id"], query="second")
    stub.plan(first["message_id"], answer_tokens=30, token_delay=0.02)
    first_listener, second_listener = listen(first["message_id"]), listen(second["message_id"])

    submit_turn(first, celery_app=rabbit.producer, settings=rabbit.settings)
    wait_for_chunks(first_listener, 1)
    submit_turn(second, celery_app=rabbit.producer, settings=rabbit.settings)
    first_end = assert_single_end(first_listener.wait_for_end(), "message_end")
    second_end = assert_single_end(second_listener.wait_for_end(), "message_end")

    assert first_end["status"] == second_end["status"] == "succeeded"
    assert second_end["answer"] == "[turn 2] You said: second."
    [second_run] = stub.runs(second["message_id"])
    snapshot = second_run["request"]["session_snapshot"]
    history = next(layer for layer in snapshot["layers"] if layer["name"] == "history")
    assert history["runtime_state"]["messages"][-1]["content"] == first_end["answer"], \
        "the second turn must start from the first one's snapshot"
