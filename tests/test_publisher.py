"""Publishing a turn's events on real Redis pub/sub: framing, coalescing and the seq counter.

Every test subscribes before anything is published and reads with bounded waits.
"""

from __future__ import annotations

import json
import random
import shutil
import socket
import string
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.backoff import ConstantBackoff
from redis.retry import Retry

from config.settings import Settings
from tests.conftest import PUBSUB_DB, REDIS_PORT, TcpProxy, retrying_redis_through, wait_until
from worker.errors import EventBusUnavailable
from worker.publisher import (
    EventBus,
    GroupCommit,
    ReplayLogPolicy,
    TurnIds,
    _PendingCall,
    replay_log_key,
    seq_key,
    seq_of,
)

READ_TIMEOUT = 5.0
LONG_WINDOW_MS = 60_000.0  # longer than any test: nothing is flushed by the window


def new_ids() -> TurnIds:
    return TurnIds(task_id=f"task-{uuid.uuid4().hex[:8]}",
                   message_id=f"msg-{uuid.uuid4().hex[:12]}",
                   conversation_id=f"conv-{uuid.uuid4().hex[:12]}")


class Channel:
    """A subscription to one turn's channel, read with bounded waits."""

    def __init__(self, pubsub: Any) -> None:
        self.pubsub = pubsub

    def next(self, timeout: float = READ_TIMEOUT) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            message = self.pubsub.get_message(ignore_subscribe_messages=True,
                                              timeout=remaining)
            if message is not None:
                event: dict[str, Any] = json.loads(message["data"])
                return event
        raise AssertionError(f"nothing published within {timeout}s")

    def take(self, count: int, timeout: float = READ_TIMEOUT) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        return [self.next(max(0.01, deadline - time.monotonic())) for _ in range(count)]

    def until(self, event_name: str, timeout: float = READ_TIMEOUT) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        events = [self.next(max(0.01, deadline - time.monotonic()))]
        while events[-1]["event"] != event_name:
            events.append(self.next(max(0.01, deadline - time.monotonic())))
        return events

    def quiet_for(self, seconds: float) -> list[dict[str, Any]]:
        """Whatever else arrives within ``seconds`` (usually asserted to be nothing)."""
        deadline = time.monotonic() + seconds
        extra = []
        while (remaining := deadline - time.monotonic()) > 0:
            message = self.pubsub.get_message(ignore_subscribe_messages=True,
                                              timeout=remaining)
            if message is not None:
                extra.append(json.loads(message["data"]))
        return extra


@pytest.fixture
def make_bus(redis_client: redis.Redis, settings: Settings) -> Callable[..., EventBus]:
    def build(window_ms: float = 20.0, max_chars: int = 512, **kwargs: Any) -> EventBus:
        return EventBus(redis_client, channel_for=settings.channel_for,
                        coalesce_window_ms=window_ms, coalesce_max_chars=max_chars, **kwargs)

    return build


@pytest.fixture
def subscribe(redis_client: redis.Redis,
              settings: Settings) -> Iterator[Callable[[TurnIds], Channel]]:
    opened: list[Any] = []

    def open_channel(ids: TurnIds) -> Channel:
        pubsub = redis_client.pubsub()
        pubsub.subscribe(settings.channel_for(ids.message_id))
        confirmation = pubsub.get_message(timeout=READ_TIMEOUT)
        assert confirmation is not None and confirmation["type"] == "subscribe"
        opened.append(pubsub)
        return Channel(pubsub)

    yield open_channel
    for pubsub in opened:
        pubsub.close()


def answers(events: list[dict[str, Any]]) -> list[str]:
    return [event["answer"] for event in events if event["event"] == "agent_message"]


# Framing and coalescing ---------------------------------------------------------------------


def test_the_first_delta_is_published_at_once_as_agent_message(
    make_bus: Callable[..., EventBus], subscribe: Callable[[TurnIds], Channel],
) -> None:
    ids = new_ids()
    channel = subscribe(ids)
    publisher = make_bus(window_ms=LONG_WINDOW_MS).turn(ids)

    before = int(time.time())
    publisher.delta("Héllo 👋")
    event = channel.next(timeout=2.0)

    assert event == {
        "event": "agent_message",
        "id": ids.message_id,
        "task_id": ids.task_id,
        "message_id": ids.message_id,
        "conversation_id": ids.conversation_id,
        "created_at": event["created_at"],
        "answer": "Héllo 👋",
        "seq": 1,
    }
    assert before <= event["created_at"] <= int(time.time())
    assert (publisher.chunks_published, publisher.chars_published) == (1, len("Héllo 👋"))


def test_later_deltas_within_the_window_are_coalesced_into_one_message(
    make_bus: Callable[..., EventBus], subscribe: Callable[[TurnIds], Channel],
) -> None:
    ids = new_ids()
    channel = subscribe(ids)
    publisher = make_bus(window_ms=300.0).turn(ids)

    for token in ["The", " quick", " brown", " fox"]:
        publisher.delta(token)
    first, coalesced = channel.take(2)

    assert (first["answer"], first["seq"]) == ("The", 1)
    assert (coalesced["event"], coalesced["answer"], coalesced["seq"]) == (
        "agent_message", " quick brown fox", 2)
    assert channel.quiet_for(0.4) == []
    assert publisher.chunks_published == 2


def test_empty_deltas_publish_nothing(
    make_bus: Callable[..., EventBus], subscribe: Callable[[TurnIds], Channel],
) -> None:
    ids = new_ids()
    channel = subscribe(ids)
    bus = make_bus(window_ms=0)
    publisher = bus.turn(ids)

    publisher.delta("")
    publisher.flush()

    assert channel.quiet_for(0.2) == []
    assert bus.last_seq(ids.message_id) == 0


def test_the_buffer_is_flushed_by_size_without_waiting_for_the_window(
    make_bus: Callable[..., EventBus], subscribe: Callable[[TurnIds], Channel],
) -> None:
    ids = new_ids()
    channel = subscribe(ids)
    publisher = make_bus(window_ms=LONG_WINDOW_MS, max_chars=10).turn(ids)

    publisher.delta("a")
    publisher.delta("12345")
    publisher.delta("6789")  # 9 buffered: below the bound
    first = channel.next(timeout=2.0)
    assert channel.quiet_for(0.2) == []
    publisher.delta("0!")  # 11 buffered: over the bound
    flushed = channel.next(timeout=2.0)

    assert (first["answer"], flushed["answer"], flushed["seq"]) == ("a", "1234567890!", 2)


def test_buffered_text_is_flushed_after_the_window_without_another_delta(
    make_bus: Callable[..., EventBus], subscribe: Callable[[TurnIds], Channel],
) -> None:
    ids = new_ids()
    channel = subscribe(ids)
    window = 0.15
    publisher = make_bus(window_ms=window * 1000).turn(ids)

    publisher.delta("Let me think")
    channel.next(timeout=2.0)
    buffered_at = time.monotonic()
    publisher.delta(" about that")  # the model pauses here: no further delta, no end
    flushed = channel.next(timeout=window + 3.0)
    waited = time.monotonic() - buffered_at

    assert (flushed["answer"], flushed["seq"]) == (" about that", 2)
    assert waited >= window * 0.9


def test_a_delta_after_a_quiet_spell_longer_than_the_window_goes_out_at_once(
    make_bus: Callable[..., EventBus], subscribe: Callable[[TurnIds], Channel],
) -> None:
    ids = new_ids()
    channel = subscribe(ids)
    window = 0.4
    publisher = make_bus(window_ms=window * 1000).turn(ids)

    publisher.delta("First.")
    channel.next(timeout=2.0)
    assert channel.quiet_for(window + 0.1) == []  # the model is slower than the window
    sent_at = time.monotonic()
    publisher.delta(" Second.")
    second = channel.next(timeout=2.0)
    waited = time.monotonic() - sent_at

    assert (second["answer"], second["seq"]) == (" Second.", 2)
    assert waited < window / 2, f"waited {waited:.3f} s for a window that had passed"


def test_a_window_of_zero_publishes_every_delta(
    make_bus: Callable[..., EventBus], subscribe: Callable[[TurnIds], Channel],
) -> None:
    ids = new_ids()
    channel = subscribe(ids)
    publisher = make_bus(window_ms=0).turn(ids)
    tokens = ["one", " two", " three", " four", " five"]

    for token in tokens:
        publisher.delta(token)
    events = channel.take(len(tokens))

    assert answers(events) == tokens
    assert [event["seq"] for event in events] == [1, 2, 3, 4, 5]
    assert channel.quiet_for(0.2) == []


def test_the_scheduler_serves_many_turns_with_their_own_windows(
    make_bus: Callable[..., EventBus], subscribe: Callable[[TurnIds], Channel],
) -> None:
    fast_bus, slow_bus = make_bus(window_ms=50), make_bus(window_ms=400)
    fast_ids, slow_ids = new_ids(), new_ids()
    fast_channel, slow_channel = subscribe(fast_ids), subscribe(slow_ids)
    fast, slow = fast_bus.turn(fast_ids), slow_bus.turn(slow_ids)

    slow.delta("s1")
    fast.delta("f1")
    slow.delta("s2")  # due in 400 ms
    fast.delta("f2")  # due in 50 ms: must not wait behind the slow turn
    fast_events = fast_channel.take(2, timeout=3.0)
    slow_first = slow_channel.next()
    fast_done_at = time.monotonic()
    slow_second = slow_channel.next(timeout=3.0)

    assert answers(fast_events) == ["f1", "f2"]
    assert (slow_first["answer"], slow_second["answer"]) == ("s1", "s2")
    assert time.monotonic() - fast_done_at > 0.1  # the slow window really was longer


# Sequence numbers ---------------------------------------------------------------------------


def test_seq_has_no_gaps_across_a_whole_turn_and_continues_after_a_retry(
    make_bus: Callable[..., EventBus], subscribe: Callable[[TurnIds], Channel],
) -> None:
    ids = new_ids()
    channel = subscribe(ids)
    first_attempt = make_bus(window_ms=LONG_WINDOW_MS).turn(ids)

    first_attempt.delta("Hello")
    first_attempt.delta(" wor")
    first_attempt.error(status=503, code="stream_interrupted", message="the stream broke")
    # A retry in another worker process: a new bus and a new publisher for the same message.
    retry_bus = make_bus(window_ms=LONG_WINDOW_MS)
    assert retry_bus.last_seq(ids.message_id) == 2
    retry = retry_bus.turn(ids)
    retry.replace("")
    retry.delta("Hello")
    retry.delta(" world")
    retry.end("Hello world", {"usage": {"total_tokens": 3}})
    events = channel.until("message_end")

    assert [(event["event"], event["seq"]) for event in events] == [
        ("agent_message", 1),
        ("error", 2),
        ("message_replace", 3),
        ("agent_message", 4),
        ("agent_message", 5),
        ("message_end", 6),
    ]
    assert retry_bus.last_seq(ids.message_id) == 6
    assert channel.quiet_for(0.2) == []


def test_last_seq_of_a_turn_that_never_published_is_zero(
    make_bus: Callable[..., EventBus],
) -> None:
    assert make_bus().last_seq(f"msg-{uuid.uuid4().hex}") == 0


def test_turns_count_seq_independently(
    make_bus: Callable[..., EventBus], subscribe: Callable[[TurnIds], Channel],
) -> None:
    bus = make_bus(window_ms=0)
    first_ids, second_ids = new_ids(), new_ids()
    first_channel, second_channel = subscribe(first_ids), subscribe(second_ids)

    bus.turn(first_ids).delta("a")
    bus.turn(first_ids).delta("b")
    bus.turn(second_ids).delta("c")

    assert [event["seq"] for event in first_channel.take(2)] == [1, 2]
    second = second_channel.next()
    assert (second["seq"], second["message_id"]) == (1, second_ids.message_id)
    assert first_channel.quiet_for(0.1) == []


def test_the_seq_counter_expires(
    make_bus: Callable[..., EventBus], redis_client: redis.Redis,
) -> None:
    bus = make_bus(window_ms=0, state_ttl_seconds=120)
    ids = new_ids()

    bus.turn(ids).delta("x")

    ttl = redis_client.ttl(bus.seq_key(ids.message_id))
    assert 0 < ttl <= 120
    assert seq_of(redis_client.get(bus.seq_key(ids.message_id))) == 1


# End, replace, error ------------------------------------------------------------------------


def test_end_flushes_buffered_deltas_before_message_end(
    make_bus: Callable[..., EventBus], subscribe: Callable[[TurnIds], Channel],
) -> None:
    ids = new_ids()
    channel = subscribe(ids)
    publisher = make_bus(window_ms=LONG_WINDOW_MS).turn(ids)
    metadata = {"usage": {"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14,
                          "total_price": "0.0000650", "currency": "USD"},
                "run_id": "run-1"}

    publisher.delta("[turn 1]")
    publisher.delta(" You said:")
    publisher.delta(" hi.")
    publisher.end("[turn 1] You said: hi.", metadata)
    events = channel.until("message_end")

    assert [event["event"] for event in events] == ["agent_message", "agent_message",
                                                    "message_end"]
    assert answers(events) == ["[turn 1]", " You said: hi."]
    end = events[-1]
    assert (end["answer"], end["metadata"], end["seq"]) == (
        "[turn 1] You said: hi.", metadata, 3)
    assert (end["task_id"], end["message_id"], end["conversation_id"]) == (
        ids.task_id, ids.message_id, ids.conversation_id)
    assert channel.quiet_for(0.2) == []


def test_replace_drops_buffered_text_and_publishes_message_replace(
    make_bus: Callable[..., EventBus], subscribe: Callable[[TurnIds], Channel],
) -> None:
    ids = new_ids()
    channel = subscribe(ids)
    window = 0.1
    publisher = make_bus(window_ms=window * 1000).turn(ids)

    publisher.delta("Draft")
    publisher.delta(" that will be thrown away")
    publisher.replace("The corrected answer.")
    events = channel.take(2)
    # The pending window passes: the dropped text must not come back.
    late = channel.quiet_for(window + 0.3)

    assert [(event["event"], event["answer"], event["seq"]) for event in events] == [
        ("agent_message", "Draft", 1), ("message_replace", "The corrected answer.", 2)]
    assert late == []


def test_error_publishes_status_code_and_message_and_drops_buffered_text(
    make_bus: Callable[..., EventBus], subscribe: Callable[[TurnIds], Channel],
) -> None:
    ids = new_ids()
    channel = subscribe(ids)
    window = 0.1
    publisher = make_bus(window_ms=window * 1000).turn(ids)

    publisher.delta("Partial")
    publisher.delta(" answer")
    publisher.error(status=400, code="model_error", message="Rate limit: «try later»")
    events = channel.take(2)
    late = channel.quiet_for(window + 0.3)

    assert events[0]["answer"] == "Partial"
    assert events[1] == {
        "event": "error",
        "id": ids.message_id,
        "task_id": ids.task_id,
        "message_id": ids.message_id,
        "conversation_id": ids.conversation_id,
        "created_at": events[1]["created_at"],
        "status": 400,
        "code": "model_error",
        "message": "Rate limit: «try later»",
        "seq": 2,
    }
    assert late == []


def test_a_long_random_token_stream_arrives_whole_and_in_order(
    make_bus: Callable[..., EventBus], subscribe: Callable[[TurnIds], Channel],
) -> None:
    ids = new_ids()
    channel = subscribe(ids)
    publisher = make_bus(window_ms=3, max_chars=64).turn(ids)
    rng = random.Random(20240611)
    alphabet = string.ascii_letters + string.digits + " .,;\n\"\\{}" + "äöü日本語🚀—"
    tokens = ["".join(rng.choices(alphabet, k=rng.randint(1, 12))) for _ in range(3000)]
    text = "".join(tokens)

    for position, token in enumerate(tokens):
        publisher.delta(token)
        if position % 250 == 0:
            time.sleep(0.005)  # a model pausing mid-answer lets the window flush
    publisher.end(text, {})
    events = channel.until("message_end", timeout=15.0)

    deltas = [event for event in events if event["event"] == "agent_message"]
    assert "".join(event["answer"] for event in deltas) == text
    assert [event["seq"] for event in events] == list(range(1, len(events) + 1))
    assert 1 < len(deltas) < len(tokens)  # coalesced, yet streamed
    assert all(len(event["answer"]) <= 64 + 12 for event in deltas)
    assert (publisher.chunks_published, publisher.chars_published) == (len(deltas), len(text))
    assert events[-1]["answer"] == text


# Redis down ---------------------------------------------------------------------------------


@pytest.fixture
def dead_redis() -> Iterator[redis.Redis]:
    client = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=1, socket_timeout=1)
    yield client
    client.close()


def test_publishing_to_a_redis_that_is_down_is_event_bus_unavailable(
    dead_redis: redis.Redis, settings: Settings,
) -> None:
    bus = EventBus(dead_redis, channel_for=settings.channel_for, coalesce_window_ms=0)
    ids = new_ids()
    publisher = bus.turn(ids)

    for publish in (lambda: publisher.delta("hello"),
                    lambda: publisher.end("hello", {}),
                    lambda: publisher.error(status=503, code="x", message="y")):
        with pytest.raises(EventBusUnavailable) as caught:
            publish()
        assert caught.value.retryable
        assert caught.value.code == "event_bus_unavailable"
        assert caught.value.message_id == ids.message_id


def test_reading_the_counter_of_a_redis_that_is_down_is_event_bus_unavailable(
    dead_redis: redis.Redis, settings: Settings,
) -> None:
    bus = EventBus(dead_redis, channel_for=settings.channel_for)

    with pytest.raises(EventBusUnavailable) as caught:
        bus.last_seq("msg-1")

    assert caught.value.retryable and caught.value.message_id == "msg-1"


class PrivateRedis:
    """A redis-server of this test's own, so it can be stopped and started mid-turn."""

    def __init__(self, directory: str) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.directory = directory
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed")
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.directory],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        probe = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 10
        try:
            while True:
                try:
                    probe.ping()
                    return
                except redis.ConnectionError:
                    if time.monotonic() > deadline or self.process.poll() is not None:
                        raise
                    time.sleep(0.02)
        finally:
            probe.close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        self.process = None


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(str(tmp_path))
    server.start()
    yield server
    server.stop()


def test_a_kept_connection_that_redis_closed_is_replaced_without_a_backoff(
    private_redis: PrivateRedis, settings: Settings,
) -> None:
    """GroupCommit does not poll a kept connection before using it, so after a Redis restart
    the first round trip finds the socket closed: it must resend at once on a new connection
    (and load the script again), not wait out the client's retry backoff."""
    client = redis.Redis(host="127.0.0.1", port=private_redis.port, socket_timeout=2,
                         retry=Retry(ConstantBackoff(5.0), 1),
                         retry_on_error=[redis.ConnectionError])
    bus = EventBus(client, channel_for=settings.channel_for)
    ids = new_ids()
    try:
        assert bus.publish(ids, "agent_message", {"answer": "before"}) == 1
        round_trips_before = bus._commit.round_trips
        private_redis.stop()
        private_redis.start()

        started = time.monotonic()
        seq = bus.publish(ids, "agent_message", {"answer": "after"})

        assert time.monotonic() - started < 2.0, "no 5 s backoff for a stale socket"
        assert seq == 1, "the restarted Redis (no persistence) numbers from 1 again"
        assert bus._commit.round_trips - round_trips_before == 3, (
            "the stale socket's, the resend (NOSCRIPT: a new server), the one after loading")
    finally:
        client.close()


def test_a_flush_that_failed_in_the_background_is_raised_on_the_next_call(
    private_redis: PrivateRedis, settings: Settings,
) -> None:
    client = redis.Redis(host="127.0.0.1", port=private_redis.port, socket_connect_timeout=1,
                         socket_timeout=1)
    window = 0.1
    bus = EventBus(client, channel_for=settings.channel_for, coalesce_window_ms=window * 1000)
    ids = new_ids()
    publisher = bus.turn(ids)
    try:
        publisher.delta("first")
        publisher.delta(" buffered")
        private_redis.stop()
        # Bounded wait for the scheduler's flush to meet the dead server.
        deadline = time.monotonic() + window + 5.0
        while publisher._failure is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert publisher._failure is not None, "the window passed without a flush attempt"
        private_redis.start()

        with pytest.raises(EventBusUnavailable) as caught:
            publisher.delta(" more")  # Redis is back, but the lost flush must not go unnoticed
        assert caught.value.retryable and caught.value.message_id == ids.message_id
        # Reported once; after that the publisher works again on the restarted server.
        publisher.delta(" again")
        publisher.flush()
        assert publisher.chunks_published == 2
    finally:
        client.close()


def test_a_publish_whose_reply_was_lost_is_not_published_twice(
    redis_client: redis.Redis, settings: Settings, subscribe: Callable[[TurnIds], Channel],
) -> None:
    proxy = TcpProxy(REDIS_PORT)
    client = retrying_redis_through(proxy)
    bus = EventBus(client, channel_for=settings.channel_for, coalesce_window_ms=0)
    ids = new_ids()
    channel = subscribe(ids)
    publisher = bus.turn(ids)
    try:
        publisher.delta("You ")
        proxy.lose_next_reply()
        publisher.delta("said: ")  # runs in Redis; the reply never arrives; the client resends
        publisher.delta("hi.")
        published = channel.take(3)
    finally:
        client.close()
        proxy.close()

    assert [(event["answer"], event["seq"]) for event in published] == [
        ("You ", 1), ("said: ", 2), ("hi.", 3)]
    assert [event["answer"] for _, event in replay_log(redis_client, ids)] == [
        "You ", "said: ", "hi."]
    assert channel.quiet_for(0.2) == []


def test_the_same_text_published_twice_on_purpose_goes_out_twice(
    make_bus: Callable[..., EventBus], subscribe: Callable[[TurnIds], Channel],
) -> None:
    ids = new_ids()
    channel = subscribe(ids)
    publisher = make_bus(window_ms=0).turn(ids)

    publisher.delta("ha")
    publisher.delta("ha")

    assert [(event["answer"], event["seq"]) for event in channel.take(2)] == [
        ("ha", 1), ("ha", 2)]


# Group commit: many turns publishing at once ------------------------------------------------



# Returns its argument after keeping Redis busy for ARGV[2] ms: a round trip that takes a while.
_SLOW_ECHO = """
local busy = tonumber(ARGV[2])
local started = redis.call('TIME')
local start_ms = started[1] * 1000 + started[2] / 1000
while true do
  local now = redis.call('TIME')
  if now[1] * 1000 + now[2] / 1000 - start_ms >= busy then break end
end
return ARGV[1]
"""


def test_many_turns_publishing_at_once_keep_each_turns_order_and_seq(
    make_bus: Callable[..., EventBus], redis_client: redis.Redis,
) -> None:
    bus = make_bus(window_ms=0)
    turns = [new_ids() for _ in range(40)]
    failures: list[BaseException] = []

    def publish_turn(ids: TurnIds) -> None:
        try:
            publisher = bus.turn(ids)
            for n in range(25):
                publisher.delta(f"{n},")
        except BaseException as exc:  # reported below: a thread's failure must fail the test
            failures.append(exc)

    threads = [threading.Thread(target=publish_turn, args=(ids,)) for ids in turns]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert not failures and not any(thread.is_alive() for thread in threads)
    for ids in turns:
        logged = replay_log(redis_client, ids)
        assert [event["seq"] for _, event in logged] == list(range(1, 26))
        assert "".join(event["answer"] for _, event in logged) == "".join(
            f"{n}," for n in range(25))


def test_calls_that_arrive_during_a_round_trip_share_the_next_one(
    redis_client: redis.Redis,
) -> None:
    client = redis.Redis(host="127.0.0.1", port=REDIS_PORT, db=PUBSUB_DB, socket_timeout=5)
    commit = GroupCommit(client, client.register_script(_SLOW_ECHO), max_in_flight=1)
    client.script_load(_SLOW_ECHO)  # else the first round trip is two: NOSCRIPT, then a retry
    results: dict[int, Any] = {}

    def call(n: int, busy_ms: int) -> None:
        results[n] = commit.call([], [n, busy_ms])

    slow = threading.Thread(target=call, args=(0, 300))
    slow.start()
    wait_until(lambda: commit.round_trips == 1, timeout=5)
    queued = [threading.Thread(target=call, args=(n, 0)) for n in range(1, 11)]
    for thread in queued:
        thread.start()
    for thread in (slow, *queued):
        thread.join(timeout=10)
    client.close()

    assert results == {n: str(n).encode() for n in range(11)}
    assert commit.round_trips == 2, "the ten calls queued behind the slow one go together"


def test_calls_made_while_a_round_trip_gathers_go_out_in_it(
    redis_client: redis.Redis,
) -> None:
    """The leader's gather is where, under gevent, the turns woken with it publish: here it
    lets four more callers in, on threads, before the round trip leaves."""
    joiners: list[threading.Thread] = []
    results: dict[int, Any] = {}

    def call(n: int) -> None:
        results[n] = commit.call([], [n, 0])

    def gather() -> None:
        joiners.extend(threading.Thread(target=call, args=(n,)) for n in range(1, 5))
        for thread in joiners:
            thread.start()
        wait_until(lambda: len(commit._gathering or ()) == 5, timeout=5)

    commit = GroupCommit(redis_client, redis_client.register_script(_SLOW_ECHO),
                         max_in_flight=4, gather=gather)
    redis_client.script_load(_SLOW_ECHO)
    call(0)
    for thread in joiners:
        thread.join(timeout=10)

    assert results == {n: str(n).encode() for n in range(5)}
    assert commit.round_trips == 1, "the four callers that came while it gathered went with it"
    assert commit._gathering is None and commit._in_flight == 0


def test_without_gathering_each_free_slot_sends_at_once(redis_client: redis.Redis) -> None:
    commit = GroupCommit(redis_client, redis_client.register_script(_SLOW_ECHO),
                         max_in_flight=4, gather=None)
    redis_client.script_load(_SLOW_ECHO)

    assert [commit.call([], [n, 0]) for n in range(3)] == [b"0", b"1", b"2"]
    assert commit.round_trips == 3 and commit._gathering is None


def test_a_caller_that_gives_up_before_the_gathered_round_trip_leaves_is_not_sent(
    redis_client: redis.Redis,
) -> None:
    commit = GroupCommit(redis_client, redis_client.register_script(_SLOW_ECHO),
                         max_in_flight=1)
    leader, quitter = _PendingCall([], ["leader", 0]), _PendingCall([], ["quitter", 0])
    commit._in_flight = 1  # ``leader`` took the slot and gathers; ``quitter`` joined it
    leader.batch = commit._gathering = [leader, quitter]

    commit._give_up(quitter)
    commit._gathering = None
    commit._lead(leader.batch)

    assert leader.done and leader.result == b"leader"
    assert not quitter.done and commit.round_trips == 1 and commit._in_flight == 0


def test_a_failed_round_trip_fails_its_calls_and_the_next_ones_go_through(
    redis_client: redis.Redis, settings: Settings,
) -> None:
    proxy = TcpProxy(REDIS_PORT)
    client = redis.Redis(host="127.0.0.1", port=proxy.port, db=PUBSUB_DB, socket_timeout=5)
    commit = GroupCommit(client, client.register_script(_SLOW_ECHO), max_in_flight=2)
    try:
        assert commit.call([], ["before", 0]) == b"before"
        proxy.cut(0.3)
        with pytest.raises(redis.ConnectionError):
            commit.call([], ["during", 0])
        wait_until(lambda: _answers(commit), timeout=5)
    finally:
        client.close()
        proxy.close()


def test_a_caller_interrupted_while_holding_a_batch_hands_it_on(
    redis_client: redis.Redis,
) -> None:
    """Under gevent a waiting caller can be killed (revoke with terminate) just after it was
    handed the next round trip: the calls queued with it must still be sent."""
    commit = GroupCommit(redis_client, redis_client.register_script(_SLOW_ECHO),
                         max_in_flight=1)
    killed, other = _PendingCall([], ["killed", 0]), _PendingCall([], ["other", 0])
    commit._in_flight = 1  # a round trip finished and handed its queue to ``killed``
    killed.batch = [killed, other]

    commit._give_up(killed)

    assert other.ready.is_set() and other.batch == [other], "the next caller sends the rest"
    assert commit._in_flight == 1, "the slot passes on with the batch"
    commit._lead(other.batch)
    assert other.done and other.result == b"other"
    assert commit._in_flight == 0 and not killed.done


def _answers(commit: GroupCommit) -> bool:
    try:
        return bool(commit.call([], ["after", 0]) == b"after")
    except redis.ConnectionError:
        return False


# The replay log -----------------------------------------------------------------------------


def replay_log(redis_client: redis.Redis, ids: TurnIds) -> list[tuple[bytes, dict[str, Any]]]:
    return [(entry_id, json.loads(fields[b"data"]))
            for entry_id, fields in redis_client.xrange(replay_log_key(ids.message_id))]


def test_every_message_is_logged_with_the_same_bytes_and_seq_as_it_was_published(
    make_bus: Callable[..., EventBus], redis_client: redis.Redis, settings: Settings,
) -> None:
    ids = new_ids()
    pubsub = redis_client.pubsub()
    pubsub.subscribe(settings.channel_for(ids.message_id))
    assert pubsub.get_message(timeout=READ_TIMEOUT) is not None
    whole = ReplayLogPolicy(ttl_seconds=3600, ttl_after_end_seconds=300, max_events=1000,
                            compact=False)
    publisher = make_bus(window_ms=LONG_WINDOW_MS, replay_log=whole).turn(ids)

    publisher.delta("Héllo")
    publisher.delta(" 👋")
    publisher.flush()
    publisher.replace("Hi")
    publisher.end("Hi", {"usage": None})
    published = []
    while len(published) < 4:
        message = pubsub.get_message(ignore_subscribe_messages=True, timeout=READ_TIMEOUT)
        assert message is not None, f"only {len(published)} messages published"
        published.append(message["data"])
    pubsub.close()
    logged = redis_client.xrange(replay_log_key(ids.message_id))

    assert [fields[b"data"] for _, fields in logged] == published
    assert [entry_id for entry_id, _ in logged] == [b"1-0", b"2-0", b"3-0", b"4-0"]
    assert [json.loads(data)["seq"] for data in published] == [1, 2, 3, 4]


def test_the_log_lives_while_the_turn_writes_and_briefly_after_its_end(
    make_bus: Callable[..., EventBus], redis_client: redis.Redis,
) -> None:
    policy = ReplayLogPolicy(ttl_seconds=3600, ttl_after_end_seconds=300, max_events=1000)
    publisher = make_bus(window_ms=0, replay_log=policy).turn(ids := new_ids())
    key = replay_log_key(ids.message_id)

    publisher.delta("a")
    live_ttl = redis_client.ttl(key)
    publisher.end("a", {"usage": None})

    assert 3590 < live_ttl <= 3600
    assert 290 < redis_client.ttl(key) <= 300
    assert redis_client.ttl(seq_key(ids.message_id)) > 3600, "the counter outlives the log"


def test_deltas_refresh_the_turns_ttls_only_once_a_quarter_of_the_log_ttl_has_passed(
    make_bus: Callable[..., EventBus], redis_client: redis.Redis,
) -> None:
    policy = ReplayLogPolicy(ttl_seconds=2, ttl_after_end_seconds=1, max_events=1000)
    publisher = make_bus(window_ms=0, replay_log=policy).turn(ids := new_ids())
    log_key, head_key = replay_log_key(ids.message_id), seq_key(ids.message_id)

    publisher.delta("a")
    first = time.monotonic()
    assert 0 < redis_client.pttl(log_key) <= 2000
    redis_client.expire(log_key, 100)
    redis_client.expire(head_key, 100)
    publisher.delta("b")
    not_refreshed = redis_client.ttl(log_key), redis_client.ttl(head_key)
    wait_until(lambda: time.monotonic() >= first + 0.5, timeout=2)
    publisher.delta("c")
    refreshed = redis_client.pttl(log_key)
    publisher.end("abc", {"usage": None})

    assert not_refreshed[0] > 90 and not_refreshed[1] > 90, "a delta within the quarter"
    assert 0 < refreshed <= 2000, "the first delta after it"
    assert 0 < redis_client.pttl(log_key) <= 1000, "the end always sets the log's TTL"
    assert [e["answer"] for _, e in replay_log(redis_client, ids)][-1] == "abc"


def test_an_error_also_shortens_the_logs_life(
    make_bus: Callable[..., EventBus], redis_client: redis.Redis,
) -> None:
    policy = ReplayLogPolicy(ttl_seconds=3600, ttl_after_end_seconds=60, max_events=1000)
    publisher = make_bus(window_ms=0, replay_log=policy).turn(ids := new_ids())

    publisher.delta("partial")
    publisher.error(status=500, code="internal_error", message="boom")

    assert 50 < redis_client.ttl(replay_log_key(ids.message_id)) <= 60


def test_the_log_never_outlives_the_seq_counter(
    make_bus: Callable[..., EventBus], redis_client: redis.Redis,
) -> None:
    policy = ReplayLogPolicy(ttl_seconds=3600, ttl_after_end_seconds=300, max_events=1000)
    bus = make_bus(window_ms=0, state_ttl_seconds=120, replay_log=policy)

    bus.turn(ids := new_ids()).delta("x")

    assert 0 < redis_client.ttl(replay_log_key(ids.message_id)) <= 120


def test_the_length_bound_covers_the_longest_turn_the_settings_allow(settings: Settings) -> None:
    policy = ReplayLogPolicy.from_settings(settings)
    # Every agent_message carries at least one character of an attempt's streamed text.
    longest_attempt = settings.max_answer_chars + 3  # + replace(""), structured replace, end
    attempts = settings.max_retries + 1

    assert policy.max_events >= attempts * longest_attempt
    assert (policy.ttl_seconds, policy.ttl_after_end_seconds) == (
        settings.replay_log_ttl_seconds, settings.replay_log_ttl_after_end_seconds)


def test_a_bound_below_the_log_length_trims_only_whole_old_nodes(
    make_bus: Callable[..., EventBus], redis_client: redis.Redis,
) -> None:
    policy = ReplayLogPolicy(ttl_seconds=60, ttl_after_end_seconds=60, max_events=10)
    publisher = make_bus(window_ms=0, replay_log=policy).turn(ids := new_ids())

    for index in range(300):
        publisher.delta(str(index))

    entries = redis_client.xrange(replay_log_key(ids.message_id))
    assert 10 <= len(entries) < 300
    assert entries[-1][0] == b"300-0"


def test_a_two_thousand_token_answer_is_compacted_to_a_few_kilobytes_of_log_at_its_end(
    make_bus: Callable[..., EventBus], redis_client: redis.Redis,
) -> None:
    """The realistic worst case: a model at 50 tokens/s against the 40 ms coalescing window
    leaves two tokens per message: about a thousand entries while it streams (docs/gateway.md),
    and once it has ended, the answer twice (its replace and its end)."""
    publisher = make_bus(window_ms=LONG_WINDOW_MS).turn(ids := new_ids())
    words = ["lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit"]
    tokens = [f" {words[index % len(words)]}" for index in range(2000)]
    key = replay_log_key(ids.message_id)

    for index, token in enumerate(tokens):
        publisher.delta(token)
        if index % 2 == 1:
            publisher.flush()  # what the window does at this pace
    live_entries, live_bytes = redis_client.xlen(key), redis_client.memory_usage(key, samples=0)
    publisher.end("".join(tokens), {"usage": {"completion_tokens": 2000}})

    assert live_entries == 1001  # the first token alone, then pairs
    assert 128 * 1024 < live_bytes < 512 * 1024
    assert redis_client.xlen(key) == 2  # the answer as one replace, then the end
    assert redis_client.memory_usage(key, samples=0) < 64 * 1024


# Steps of the agent's process (agent_thought) --------------------------------------------


def _step(step_id: str, thought: str) -> dict[str, Any]:
    return {"id": step_id, "position": 1, "thought": thought, "tool": "", "tool_labels": {},
            "tool_input": "", "observation": "", "message_files": []}


def test_updates_of_one_step_are_coalesced_to_its_newest_state(
    make_bus: Callable[..., EventBus], subscribe: Callable[[TurnIds], Channel],
) -> None:
    ids = new_ids()
    channel = subscribe(ids)
    publisher = make_bus(window_ms=LONG_WINDOW_MS).turn(ids)

    publisher.step(_step("step-1", "I"))
    for thought in ("I think", "I think so", "I think so."):
        publisher.step(_step("step-1", thought))
    publisher.flush()

    first, newest = channel.take(2)
    assert (first["event"], first["id"], first["thought"]) == ("agent_thought", "step-1", "I")
    assert (newest["id"], newest["thought"], newest["message_id"]) == (
        "step-1", "I think so.", ids.message_id)
    assert channel.quiet_for(0.2) == []


def test_steps_and_answer_text_go_out_in_the_order_they_came(
    make_bus: Callable[..., EventBus], subscribe: Callable[[TurnIds], Channel],
) -> None:
    ids = new_ids()
    channel = subscribe(ids)
    publisher = make_bus(window_ms=LONG_WINDOW_MS).turn(ids)

    publisher.step(_step("step-1", "look it up"))
    publisher.delta("The answer")
    publisher.step(_step("step-2", "check"))
    publisher.delta(" is")
    publisher.delta(" 42.")
    publisher.end("The answer is 42.", {"usage": None})

    events = channel.take(5)
    assert [(event["event"], event.get("thought") or event.get("answer")) for event in events] \
        == [("agent_thought", "look it up"), ("agent_message", "The answer"),
            ("agent_thought", "check"), ("agent_message", " is 42."),
            ("message_end", "The answer is 42.")]
    assert [event["seq"] for event in events] == [1, 2, 3, 4, 5]


def test_the_first_answer_text_goes_out_at_once_even_after_a_step(
    make_bus: Callable[..., EventBus], subscribe: Callable[[TurnIds], Channel],
) -> None:
    ids = new_ids()
    channel = subscribe(ids)
    publisher = make_bus(window_ms=LONG_WINDOW_MS).turn(ids)

    publisher.step(_step("step-1", "thinking"))
    publisher.delta("Hi")

    assert [event["event"] for event in channel.take(2)] == ["agent_thought", "agent_message"]


def test_discard_drops_what_is_queued_so_nothing_follows_an_error(
    make_bus: Callable[..., EventBus], subscribe: Callable[[TurnIds], Channel],
) -> None:
    ids = new_ids()
    channel = subscribe(ids)
    bus = make_bus(window_ms=30)
    publisher = bus.turn(ids)
    publisher.delta("shown")
    publisher.delta(" queued")
    publisher.step(_step("step-1", "queued too"))

    publisher.discard()
    bus.turn(ids).error(status=502, code="backend_protocol_error", message="bad frame")

    assert [event["event"] for event in channel.take(2)] == ["agent_message", "error"]
    assert channel.quiet_for(0.3) == []


# A finished turn's log, compacted ---------------------------------------------------------


def _full_step(step_id: str, position: int, thought: str, observation: str = "") -> dict[str, Any]:
    return {"id": step_id, "position": position, "thought": thought, "tool": "",
            "tool_labels": {}, "tool_input": "", "observation": observation,
            "message_files": []}


def _client_state(events: list[dict[str, Any]],
                  text: str = "", steps: dict[str, Any] | None = None) -> tuple[str, dict]:
    """What a Dify-style client shows after these events: the text, and its steps by id."""
    shown = dict(steps or {})
    for event in events:
        if event["event"] == "agent_message":
            text += event["answer"]
        elif event["event"] == "message_replace":
            text = event["answer"]
            if event["answer"] == "":
                shown = {}
        elif event["event"] == "agent_thought":
            shown[event["id"]] = {k: event[k] for k in ("position", "thought", "observation")}
    return text, shown


def _publish_a_turn_with_steps(bus: EventBus, ids: TurnIds, subscriber: Channel,
                               *, retried: bool = False) -> list[dict[str, Any]]:
    publisher = bus.turn(ids)
    if retried:
        publisher.step(_full_step("old-1", 1, "a thought of the failed attempt"))
        publisher.delta("Text the failed attempt showed. ")
        publisher.replace("")
    publisher.step(_full_step("s-1", 1, "Thinking"))
    publisher.step(_full_step("s-1", 1, "Thinking about it"))
    for word in ("The ", "answer ", "is "):
        publisher.delta(word)
    publisher.step(_full_step("s-2", 2, "Looking it up", observation="42"))
    publisher.event("human_input_required", {"tool_call_id": "call-1", "tool_name":
                                              "ask_human", "args": {"question": "OK?"}})
    for word in ("forty", "-", "two."):
        publisher.delta(word)
    publisher.end("The answer is forty-two.", {"usage": None})
    events = []
    while not events or events[-1]["event"] != "message_end":
        events.append(subscriber.next())
    return events


def test_a_finished_turns_log_keeps_the_steps_last_versions_the_other_events_and_the_answer(
    make_bus: Callable[..., EventBus], redis_client: redis.Redis,
    subscribe: Callable[[TurnIds], Channel],
) -> None:
    ids = new_ids()
    live = _publish_a_turn_with_steps(make_bus(window_ms=0), ids, subscribe(ids))

    kept = replay_log(redis_client, ids)

    last_text = max(e["seq"] for e in live if e["event"] == "agent_message")
    assert [(e["event"], e.get("id")) for _, e in kept] == [
        ("agent_thought", "s-1"), ("agent_thought", "s-2"),
        ("human_input_required", ids.message_id), ("message_replace", ids.message_id),
        ("message_end", ids.message_id)]
    assert kept[0][1]["thought"] == "Thinking about it", "only the step's last version"
    assert kept[3][1]["answer"] == "The answer is forty-two." and kept[3][1]["seq"] == last_text
    assert [entry_id for entry_id, _ in kept] == [f"{e['seq']}-0".encode() for _, e in kept]
    assert kept[-1][1] == live[-1], "the end is the very event clients got"


@pytest.mark.parametrize("retried", [False, True], ids=["one attempt", "a retry reset it"])
def test_a_client_resuming_a_finished_turn_after_any_seq_ends_with_exactly_its_answer(
    make_bus: Callable[..., EventBus], redis_client: redis.Redis,
    subscribe: Callable[[TurnIds], Channel], retried: bool,
) -> None:
    ids = new_ids()
    live = _publish_a_turn_with_steps(make_bus(window_ms=0), ids, subscribe(ids),
                                      retried=retried)
    kept = [event for _, event in replay_log(redis_client, ids)]
    truth = _client_state(live)

    for after in range(len(live) + 1):
        had = _client_state(live[:after])
        resumed = _client_state([e for e in kept if e["seq"] > after], *had)
        assert resumed == truth, f"a client resuming after seq {after}"
    assert truth[0] == "The answer is forty-two."
    assert set(truth[1]) == {"s-1", "s-2"}, "the failed attempt's step is gone for everyone"


def test_a_log_is_kept_whole_when_compaction_is_off(
    make_bus: Callable[..., EventBus], redis_client: redis.Redis,
    subscribe: Callable[[TurnIds], Channel],
) -> None:
    ids = new_ids()
    whole = ReplayLogPolicy(ttl_seconds=3600, ttl_after_end_seconds=300, max_events=1000,
                            compact=False)
    live = _publish_a_turn_with_steps(make_bus(window_ms=0, replay_log=whole), ids,
                                      subscribe(ids))

    assert [event for _, event in replay_log(redis_client, ids)] == live


def test_an_error_leaves_the_log_whole(
    make_bus: Callable[..., EventBus], redis_client: redis.Redis,
) -> None:
    publisher = make_bus(window_ms=0).turn(ids := new_ids())

    publisher.delta("partial ")
    publisher.delta("text")
    publisher.error(status=500, code="internal_error", message="boom")

    assert [e["event"] for _, e in replay_log(redis_client, ids)] == [
        "agent_message", "agent_message", "error"]


def test_a_head_holding_a_bare_seq_as_older_workers_wrote_it_counts_on_from_it(
    make_bus: Callable[..., EventBus], redis_client: redis.Redis,
    subscribe: Callable[[TurnIds], Channel],
) -> None:
    ids = new_ids()
    redis_client.set(seq_key(ids.message_id), 5)
    channel = subscribe(ids)

    make_bus(window_ms=0).turn(ids).delta("next")

    assert channel.next()["seq"] == 6
    assert seq_of(redis_client.get(seq_key(ids.message_id))) == 6
