"""The SSE gateway as a client sees it: a real gateway process on a socket, real Redis, real SSE
clients (httpx), a real browser for the demo page (headless Chromium, driven by Playwright where
it must click and wait), and the real worker and stub backend where a whole turn matters.

Ground truth is a plain pub/sub subscriber present from before a turn starts: every gateway
client, however late it comes or however often it reconnects, must end up with exactly its
messages, in order, once each. Tests that need a turn to be in a given state publish with the
worker's own ``EventBus`` instead, which is quicker and exact.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import redis

from config.settings import Settings
from gateway.tokens import mint_stream_token
from tests.conftest import (
    REDIS_PORT,
    ROOT,
    WAIT_SECONDS,
    RunningGateway,
    RunningWorker,
    SSEFrame,
    SSEParser,
    StubControl,
    TcpProxy,
    TurnListener,
    answer_of,
    gateway_settings,
    make_turn,
    start_gateway,
    stop_worker,
    wait_until,
)
from worker.client import submit_turn
from worker.ownership import owner_fingerprint, owner_key, refusal_stream
from worker.publisher import EventBus, ReplayLogPolicy, TurnIds, TurnPublisher, replay_log_key
from worker.questions import answered_key

if TYPE_CHECKING:
    from playwright.sync_api import Page

    from gateway.relay import Subscription

ARTIFACTS = ROOT / "artifacts"
# The owner of make_turn's turns and of RunningGateway.token's default tokens, and another one.
OWNER = owner_fingerprint("tenant-1", "app-1", "user-1")
INTRUDER = owner_fingerprint("tenant-2", "app-1", "user-1")
# One database is enough here: the gateway never touches the store.
SQLITE_WORKER = pytest.mark.parametrize("celery_worker", ["sqlite"], indirect=True)


@dataclass
class StreamRead:
    """What one GET of a turn's stream gave: status, headers, and frames or an error body."""

    status: int
    headers: httpx.Headers
    frames: list[SSEFrame] = field(default_factory=list)
    body: str = ""
    ended_by_server: bool = False

    @property
    def events(self) -> list[dict[str, Any]]:
        return [frame.json() for frame in self.frames if frame.event is None]

    @property
    def pings(self) -> int:
        return sum(frame.event == "ping" for frame in self.frames)


def read_stream(url: str, *, token: str | None, last_event_id: int | None = None,
                max_events: int | None = None, timeout: float = WAIT_SECONDS,
                on_frame: Callable[[SSEFrame], None] | None = None) -> StreamRead:
    """GET a stream and read it until the server ends it, or ``max_events`` data frames."""
    headers = {"Last-Event-ID": str(last_event_id)} if last_event_id is not None else {}
    params = {"token": token} if token is not None else {}
    deadline = time.monotonic() + timeout
    with httpx.stream("GET", url, params=params, headers=headers,
                      timeout=httpx.Timeout(5.0)) as response:
        read = StreamRead(response.status_code, response.headers)
        if response.status_code != 200:
            read.body = response.read().decode()
            return read
        parser = SSEParser()
        for line in response.iter_lines():
            frame = parser.feed(line)
            if frame is None:
                continue
            read.frames.append(frame)
            if on_frame is not None:
                on_frame(frame)
            if max_events is not None and len(read.events) >= max_events:
                return read
            if time.monotonic() > deadline:
                raise AssertionError(f"stream still open after {timeout}s: {read.events[-3:]}")
        read.ended_by_server = True
        return read


def wait_for_count(listener: TurnListener, count: int, timeout: float = WAIT_SECONDS) -> None:
    """Let a direct subscriber collect ``count`` events, so a test can act mid-turn."""
    deadline = time.monotonic() + timeout
    while len(listener.events) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"only {len(listener.events)} events within {timeout}s")
        message = listener.pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
        if message is not None:
            listener.events.append(json.loads(message["data"]))
    assert listener.events[-1]["event"] not in ("message_end", "error"), "the turn ended early"


@pytest.fixture
def event_bus(redis_client: redis.Redis, settings: Settings) -> EventBus:
    """The worker's bus with finished turns' logs kept whole: these tests follow every seq
    through the relay. (A compacted log is tested on its own, below.)"""
    return EventBus(redis_client, channel_for=settings.channel_for,
                    coalesce_window_ms=settings.coalesce_window_ms,
                    coalesce_max_chars=settings.coalesce_max_chars,
                    replay_log=ReplayLogPolicy(ttl_seconds=3600, ttl_after_end_seconds=300,
                                               max_events=10_000, compact=False))


def logged(bus: EventBus, message_id: str) -> list[dict[str, Any]]:
    return [json.loads(fields[b"data"])
            for _, fields in bus.redis.xrange(replay_log_key(message_id))]


def new_ids() -> TurnIds:
    return TurnIds(task_id=f"task-{uuid.uuid4().hex[:8]}",
                   message_id=f"msg-{uuid.uuid4().hex[:12]}",
                   conversation_id=f"conv-{uuid.uuid4().hex[:12]}")


def record_owner(bus: EventBus, message_id: str, owner: str = OWNER) -> None:
    """Say whose turn the message is, as the worker does before it publishes anything."""
    bus.redis.set(owner_key(message_id), owner, ex=3600)


def live_turn(gateway: RunningGateway, bus: EventBus) -> tuple[TurnIds, Any, str, str]:
    """A turn whose owner is recorded and nothing published yet: its ids, its publisher, its
    stream's URL and a token for it."""
    ids = new_ids()
    record_owner(bus, ids.message_id)
    return ids, bus.turn(ids), gateway.events_url(ids.message_id), gateway.token(ids.message_id)


def publish_turn(bus: EventBus, ids: TurnIds, deltas: list[str],
                 owner: str | None = OWNER) -> None:
    """A whole turn as the worker publishes it: its owner recorded, deltas, the end."""
    if owner is not None:
        record_owner(bus, ids.message_id, owner)
    publisher = bus.turn(ids)
    for delta in deltas:
        publisher.delta(delta)
        publisher.flush()
    publisher.end("".join(deltas), {"usage": None})


def assert_exactly_the_turn(read: StreamRead, truth: list[dict[str, Any]]) -> None:
    """The client got the turn's messages, each once, in order, ids matching seqs."""
    assert read.events == truth
    assert [frame.id for frame in read.frames if frame.event is None] == [
        str(event["seq"]) for event in truth]
    assert [event["seq"] for event in truth] == list(range(1, len(truth) + 1))


# Lossless delivery through the real worker --------------------------------------------------


@SQLITE_WORKER
def test_a_client_that_connects_after_half_the_chunks_gets_the_whole_turn_once(
    celery_worker: RunningWorker, stub: StubControl, listen: Any, producer_app: Any,
    gateway: RunningGateway,
) -> None:
    turn = make_turn(query="tell me a long story")
    stub.plan(turn["message_id"], answer_tokens=40, token_delay=0.03)
    listener = listen(turn["message_id"])
    submitted = submit_turn(turn, celery_app=producer_app, settings=gateway.settings)

    wait_for_count(listener, 21)
    seen_when_connecting = len(listener.events)
    read = read_stream(gateway.events_url(turn["message_id"]), token=submitted.stream_token)
    truth = listener.wait_for_end()

    assert 2 * seen_when_connecting >= len(truth) > seen_when_connecting
    assert read.status == 200 and read.ended_by_server
    assert_exactly_the_turn(read, truth)
    assert read.events[-1]["event"] == "message_end"
    assert answer_of(read.events) == read.events[-1]["answer"]
    assert read.events[-1]["answer"].startswith("[turn 1] You said: tell me a long story.")


@SQLITE_WORKER
def test_a_client_resumes_from_last_event_id_in_the_middle_of_a_turn(
    celery_worker: RunningWorker, stub: StubControl, listen: Any, producer_app: Any,
    gateway: RunningGateway,
) -> None:
    turn = make_turn()
    stub.plan(turn["message_id"], answer_tokens=40, token_delay=0.03)
    listener = listen(turn["message_id"])
    submitted = submit_turn(turn, celery_app=producer_app, settings=gateway.settings)
    url = gateway.events_url(turn["message_id"])

    first = read_stream(url, token=submitted.stream_token, max_events=8)
    resumed_from = int(first.frames[-1].id or 0)
    second = read_stream(url, token=submitted.stream_token, last_event_id=resumed_from,
                         max_events=5)
    third = read_stream(url, token=submitted.stream_token,
                        last_event_id=int(second.frames[-1].id or 0))
    truth = listener.wait_for_end()

    assert resumed_from == 8 and not first.ended_by_server
    assert len(truth) > 13, "the turn should have been streaming while the client resumed"
    assert first.events + second.events + third.events == truth
    assert third.ended_by_server and third.events[-1]["event"] == "message_end"


@SQLITE_WORKER
def test_a_turn_that_is_over_replays_at_once_and_then_tells_the_browser_to_stop(
    celery_worker: RunningWorker, stub: StubControl, listen: Any, producer_app: Any,
    gateway: RunningGateway,
) -> None:
    turn = make_turn()
    listener = listen(turn["message_id"])
    submitted = submit_turn(turn, celery_app=producer_app, settings=gateway.settings)
    truth = listener.wait_for_end()
    url = gateway.events_url(turn["message_id"])

    started = time.monotonic()
    replayed = read_stream(url, token=submitted.stream_token)
    took = time.monotonic() - started
    after_the_end = read_stream(url, token=submitted.stream_token,
                                last_event_id=truth[-1]["seq"])

    assert replayed.ended_by_server and replayed.pings == 0
    assert took < gateway.settings.gateway_ping_interval_seconds
    # The finished turn's log is compacted: its answer as one replace, then its end.
    assert [e["event"] for e in replayed.events if e["event"] != "agent_thought"] == [
        "message_replace", "message_end"]
    assert answer_of(replayed.events) == truth[-1]["answer"] == answer_of(truth)
    assert replayed.events[-1] == truth[-1]
    assert [frame.id for frame in replayed.frames if frame.event is None] == [
        str(event["seq"]) for event in replayed.events]
    assert after_the_end.status == 204


@SQLITE_WORKER
def test_a_finished_turn_resumed_after_any_event_ends_with_exactly_its_answer_and_steps(
    celery_worker: RunningWorker, stub: StubControl, listen: Any, producer_app: Any,
    gateway: RunningGateway,
) -> None:
    turn = make_turn(query="THINK, then CALL_TOOL:lookup and answer")
    stub.plan(turn["message_id"], answer_tokens=12)
    listener = listen(turn["message_id"])
    submitted = submit_turn(turn, celery_app=producer_app, settings=gateway.settings)
    truth = listener.wait_for_end()
    url = gateway.events_url(turn["message_id"])

    def shown(events: list[dict[str, Any]], text: str = "",
              steps: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
        steps = dict(steps or {})
        for event in events:
            if event["event"] == "agent_message":
                text += event["answer"]
            elif event["event"] == "message_replace":
                text = event["answer"]
            elif event["event"] == "agent_thought":
                steps[event["id"]] = event
        return text, steps

    for after in range(len(truth)):
        resumed = read_stream(url, token=submitted.stream_token, last_event_id=after or None)
        assert resumed.events[-1] == truth[-1]
        assert shown(resumed.events, *shown(truth[:after])) == shown(truth), (
            f"resumed after seq {after}")


@SQLITE_WORKER
def test_two_hundred_concurrent_clients_all_get_the_identical_stream(
    celery_worker: RunningWorker, stub: StubControl, listen: Any, producer_app: Any,
    gateway: RunningGateway,
) -> None:
    turn = make_turn(query="many readers")
    # Long enough (3 s) for the late hundred to connect while it streams: a client that
    # connects after the end reads the compacted log, a shorter stream with the same answer.
    stub.plan(turn["message_id"], answer_tokens=60, token_delay=0.05)
    listener = listen(turn["message_id"])
    token = gateway.token(turn["message_id"])
    url = gateway.events_url(turn["message_id"])

    async def one_client(client: httpx.AsyncClient, connected: asyncio.Event) -> list[str]:
        frames: list[str] = []
        parser = SSEParser()
        async with client.stream("GET", url, params={"token": token}) as response:
            assert response.status_code == 200
            connected.set()
            async for line in response.aiter_lines():
                frame = parser.feed(line)
                if frame is not None and frame.event is None:
                    frames.append(frame.data)
        return frames

    async def everyone() -> list[list[str]]:
        limits = httpx.Limits(max_connections=250, max_keepalive_connections=0)
        async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(10.0)) as client:
            early = [asyncio.Event() for _ in range(100)]
            early_clients = [asyncio.create_task(one_client(client, ready)) for ready in early]
            await asyncio.wait_for(asyncio.gather(*(ready.wait() for ready in early)), 20)
            submit_turn(turn, celery_app=producer_app, settings=gateway.settings)
            await asyncio.to_thread(wait_for_count, listener, 5)
            late = [asyncio.create_task(one_client(client, asyncio.Event()))
                    for _ in range(100)]
            return await asyncio.wait_for(asyncio.gather(*early_clients, *late), 30)

    streams = asyncio.run(everyone())
    truth = listener.wait_for_end()

    assert len(streams) == 200
    assert [json.loads(data) for data in streams[0]] == truth
    assert all(stream == streams[0] for stream in streams)
    # Each stream lets go of its subscription just after its last chunk: one channel, then none.
    deadline = time.monotonic() + 5
    while (health := gateway.health())["channels"] or health["subscriptions"]:
        assert time.monotonic() < deadline, f"subscriptions left behind: {health}"
        time.sleep(0.05)


# Access -------------------------------------------------------------------------------------


def _tampered_claims(token: str, **changes: Any) -> str:
    """The token with its claims changed and its signature kept."""
    version, claims_part, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(claims_part + "=" * (-len(claims_part) % 4)))
    claims.update(changes)
    encoded = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{version}.{encoded}.{signature}"


def _other_secret_token(message_id: str) -> str:
    return mint_stream_token(b"not-the-gateway-secret", message_id=message_id,
                             user_id="user-1", owner=OWNER, ttl_seconds=600)


def _expired_token(gateway: RunningGateway, message_id: str) -> str:
    return mint_stream_token(gateway.settings.gateway_secret.get_secret_value().encode(),
                             message_id=message_id, user_id="user-1", owner=OWNER,
                             ttl_seconds=60, now=time.time() - 120)


TOKEN_FAILURES: dict[str, tuple[Callable[[RunningGateway, str], str | None], int, str]] = {
    "no token": (lambda gateway, message_id: None, 401, "token_missing"),
    "garbage": (lambda gateway, message_id: "not-a-token", 401, "token_invalid"),
    "bad signature": (lambda gateway, message_id: gateway.token(message_id)[:-4] + "AAAA",
                      401, "token_invalid"),
    "another secret": (lambda gateway, message_id: _other_secret_token(message_id),
                       401, "token_invalid"),
    "expired": (_expired_token, 401, "token_expired"),
    "another turn's token": (lambda gateway, message_id: gateway.token("msg-someone-else"),
                             403, "token_wrong_turn"),
    "tampered user": (lambda gateway, message_id: _tampered_claims(gateway.token(message_id),
                                                                    u="user-2"),
                      401, "token_invalid"),
    "tampered owner": (lambda gateway, message_id: _tampered_claims(gateway.token(message_id),
                                                                     o=INTRUDER),
                       401, "token_invalid"),
    "tampered expiry": (lambda gateway, message_id: _tampered_claims(
        _expired_token(gateway, message_id), e=int(time.time()) + 3600), 401, "token_invalid"),
    "tampered turn": (lambda gateway, message_id: _tampered_claims(
        gateway.token("msg-someone-else"), m=message_id), 401, "token_invalid"),
}


@pytest.mark.parametrize("case", list(TOKEN_FAILURES))
def test_a_stream_without_a_valid_token_for_the_turn_is_refused_with_json(
    case: str, gateway: RunningGateway, event_bus: EventBus,
) -> None:
    ids = new_ids()
    publish_turn(event_bus, ids, ["secret ", "answer"])
    make_token, status, code = TOKEN_FAILURES[case]

    read = read_stream(gateway.events_url(ids.message_id), token=make_token(gateway,
                                                                            ids.message_id))

    assert read.status == status
    assert read.headers["content-type"] == "application/json"
    assert json.loads(read.body) == {"status": status, "code": code,
                                     "message": json.loads(read.body)["message"]}
    assert "secret answer" not in read.body and "data:" not in read.body
    assert gateway.settings.gateway_secret.get_secret_value() not in gateway.log_path.read_text()


def test_a_bearer_token_in_the_authorization_header_opens_the_stream(
    gateway: RunningGateway, event_bus: EventBus,
) -> None:
    ids = new_ids()
    publish_turn(event_bus, ids, ["hello"])

    response = httpx.get(gateway.events_url(ids.message_id), timeout=5,
                         headers={"Authorization": f"Bearer {gateway.token(ids.message_id)}"})

    assert response.status_code == 200
    assert "id: 2\ndata: {" in response.text and '"event":"message_end"' in response.text


# Owners -------------------------------------------------------------------------------------


def refuse(bus: EventBus, ids: TurnIds, sender: str) -> None:
    """The worker's refusal of a sender's turn that names another owner's message: one error,
    on the sender's own refusal stream, never on the message's channel."""
    refused = TurnIds(task_id=f"task-{uuid.uuid4().hex[:8]}", message_id=ids.message_id,
                      conversation_id=ids.conversation_id,
                      stream=refusal_stream(ids.message_id, sender))
    bus.turn(refused).error(status=404, code="conversation_not_found",
                            message=f"conversation {ids.conversation_id} not found")


def test_another_owners_token_gets_only_its_own_refusal_and_nothing_of_the_turn(
    gateway: RunningGateway, event_bus: EventBus,
) -> None:
    ids = new_ids()
    publish_turn(event_bus, ids, ["the owner's ", "secret answer"])
    refuse(event_bus, ids, INTRUDER)
    url = gateway.events_url(ids.message_id)

    intruder = read_stream(url, token=gateway.token(ids.message_id, tenant_id="tenant-2"))
    owner = read_stream(url, token=gateway.token(ids.message_id))

    assert intruder.status == 200 and intruder.ended_by_server
    assert [(event["seq"], event["event"], event["code"]) for event in intruder.events] == [
        (1, "error", "conversation_not_found")]
    assert [frame.id for frame in intruder.frames if frame.event is None] == ["1"]
    assert "secret" not in "".join(frame.data for frame in intruder.frames)
    assert answer_of(owner.events) == "the owner's secret answer"
    assert [event["event"] for event in owner.events][-1] == "message_end"


def test_streams_opened_before_the_owner_is_recorded_give_the_turn_to_its_owner_alone(
    gateway: RunningGateway, event_bus: EventBus,
) -> None:
    """Both streams open while no worker has claimed the message; then the owner's turn runs
    and the intruder's turn is refused. The owner gets the whole turn, the intruder only its
    refusal, though the other's events reached its subscription first."""
    ids = new_ids()
    url = gateway.events_url(ids.message_id)
    opened = {"owner": threading.Event(), "intruder": threading.Event()}

    def reader(name: str, token: str) -> StreamRead:
        return read_stream(url, token=token, on_frame=lambda frame: opened[name].set())

    with ThreadPoolExecutor(2) as pool:
        owner_read = pool.submit(reader, "owner", gateway.token(ids.message_id))
        intruder_read = pool.submit(reader, "intruder",
                                    gateway.token(ids.message_id, tenant_id="tenant-2"))
        assert all(event.wait(WAIT_SECONDS) for event in opened.values())
        publish_turn(event_bus, ids, ["the owner's ", "secret answer"])
        refuse(event_bus, ids, INTRUDER)
        owner, intruder = owner_read.result(WAIT_SECONDS), intruder_read.result(WAIT_SECONDS)

    truth = [json.loads(fields[b"data"])
             for _, fields in event_bus.redis.xrange(replay_log_key(ids.message_id))]
    assert_exactly_the_turn(owner, truth)
    assert answer_of(owner.events) == "the owner's secret answer"
    assert [(event["seq"], event["event"]) for event in intruder.events] == [(1, "error")]
    assert "secret" not in "".join(frame.data for frame in intruder.frames)
    log_text = gateway.log_path.read_text()
    assert f"stream of turn {ids.message_id} for user user-1 routed to own" in log_text
    assert f"stream of turn {ids.message_id} for user user-1 routed to refused" in log_text


# The stream itself -------------------------------------------------------------------------


def test_the_stream_has_no_buffering_headers_and_pings_while_the_turn_is_quiet(
    gateway: RunningGateway, event_bus: EventBus,
) -> None:
    ids = new_ids()
    first_frames: list[SSEFrame] = []

    def publish_after_two_pings(frame: SSEFrame) -> None:
        first_frames.append(frame)
        if [f.event for f in first_frames] == ["ping", "ping"]:
            publish_turn(event_bus, ids, ["after ", "the pings"])

    read = read_stream(gateway.events_url(ids.message_id), token=gateway.token(ids.message_id),
                       on_frame=publish_after_two_pings)

    assert read.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert read.headers["cache-control"] == "no-cache"
    assert read.headers["x-accel-buffering"] == "no"
    assert [frame.event for frame in read.frames[:2]] == ["ping", "ping"]
    assert [frame.data for frame in read.frames[:2]] == ["", ""]
    assert answer_of(read.events) == "after the pings"
    assert read.ended_by_server


def test_a_turn_whose_log_has_expired_is_gone(
    gateway: RunningGateway, event_bus: EventBus, redis_client: redis.Redis,
) -> None:
    ids = new_ids()
    publish_turn(event_bus, ids, ["long ago"])
    redis_client.delete(replay_log_key(ids.message_id))

    read = read_stream(gateway.events_url(ids.message_id), token=gateway.token(ids.message_id))

    assert read.status == 410 and json.loads(read.body)["code"] == "turn_expired"


@dataclass
class Answer:
    """The status line, headers and (for anything but a stream) body of one request."""

    status: int
    headers: httpx.Headers
    body: bytes
    seconds: float


def answer_to(method: str, url: str, *, params: dict[str, str] | None = None,
              headers: dict[str, str] | None = None) -> Answer:
    """One request whose body is read only if it is not a stream: a 200 stream that should
    not have been opened fails the test's status check instead of hanging on pings."""
    started = time.monotonic()
    with httpx.stream(method, url, params=params, headers=headers,
                      timeout=httpx.Timeout(5.0)) as response:
        body = b"" if response.status_code == 200 and method == "GET" else response.read()
        return Answer(response.status_code, response.headers, body,
                      time.monotonic() - started)


# Not seqs: signs, spaces, underscores (int() takes those three), other digits, other bases,
# past the 64-bit stream ids, and a number too long for anything.
NOT_A_SEQ = {
    "a word": "seven", "a plus sign": "+2", "spaces around": " 3 ", "an underscore": "1_0",
    "negative": "-1", "empty": "", "hexadecimal": "0x10", "a decimal point": "1.0",
    "Arabic-Indic digit": "\u0663", "2^63": str(2**63), "2^64+1": str(2**64 + 1),
    "4,000 digits": "9" * 4000,
}


@pytest.mark.parametrize("case", list(NOT_A_SEQ))
def test_an_after_that_is_not_a_strict_seq_is_a_bad_request(
    case: str, gateway: RunningGateway, event_bus: EventBus,
) -> None:
    ids = new_ids()
    publish_turn(event_bus, ids, ["hello"])

    answer = answer_to("GET", gateway.events_url(ids.message_id),
                       params={"token": gateway.token(ids.message_id),
                               "after": NOT_A_SEQ[case]})

    assert answer.status == 400
    assert json.loads(answer.body)["code"] == "invalid_param"


@pytest.mark.parametrize("case", ["a plus sign", "an underscore", "negative", "2^63",
                                  "4,000 digits"])
def test_a_last_event_id_that_is_not_a_strict_seq_is_a_bad_request(
    case: str, gateway: RunningGateway, event_bus: EventBus,
) -> None:
    ids = new_ids()
    publish_turn(event_bus, ids, ["hello"])

    answer = answer_to("GET", gateway.events_url(ids.message_id),
                       params={"token": gateway.token(ids.message_id)},
                       headers={"Last-Event-ID": NOT_A_SEQ[case]})

    assert answer.status == 400
    assert json.loads(answer.body)["code"] == "invalid_param"


def test_a_resume_point_at_or_past_the_end_of_a_finished_turn_is_answered_at_once_with_204(
    gateway: RunningGateway, event_bus: EventBus,
) -> None:
    ids = new_ids()
    publish_turn(event_bus, ids, ["one ", "two"])  # seqs 1, 2 and the end, 3
    url, token = gateway.events_url(ids.message_id), gateway.token(ids.message_id)

    answers = [answer_to("GET", url, params={"token": token, "after": after})
               for after in ("3", "4", "999", str(2**63 - 1))]
    answers.append(answer_to("GET", url, params={"token": token},
                             headers={"Last-Event-ID": str(2**63 - 1)}))

    assert [answer.status for answer in answers] == [204] * 5
    assert all(answer.body == b"" for answer in answers)
    assert max(answer.seconds for answer in answers) < (
        gateway.settings.gateway_ping_interval_seconds)


def test_a_resume_point_past_the_last_event_of_a_turn_that_has_not_ended_is_a_bad_request(
    gateway: RunningGateway, event_bus: EventBus,
) -> None:
    running, quiet, unclaimed = new_ids(), new_ids(), new_ids()
    record_owner(event_bus, running.message_id)
    publisher = event_bus.turn(running)
    for delta in ("one ", "two"):
        publisher.delta(delta)
        publisher.flush()
    record_owner(event_bus, quiet.message_id)  # claimed, nothing published yet

    past_the_end = [
        answer_to("GET", gateway.events_url(ids.message_id),
                  params={"token": gateway.token(ids.message_id), "after": after})
        for ids, after in ((running, "3"), (running, "999"), (quiet, "1"), (unclaimed, "1"))]

    def end_on_first_ping(frame: SSEFrame) -> None:
        if frame.event == "ping":
            publisher.end("one two", {"usage": None})

    at_the_end = read_stream(gateway.events_url(running.message_id),
                             token=gateway.token(running.message_id), last_event_id=2,
                             on_frame=end_on_first_ping)

    assert [answer.status for answer in past_the_end] == [400] * 4
    assert {json.loads(answer.body)["message"] for answer in past_the_end} == {
        "resume point past the turn's last event"}
    assert at_the_end.status == 200 and at_the_end.ended_by_server
    assert [(event["seq"], event["event"]) for event in at_the_end.events] == [
        (3, "message_end")]


@pytest.mark.parametrize("case", ["nothing is ever published",
                                  "only another owner's turn is published"])
def test_a_stream_of_a_turn_that_never_starts_ends_with_turn_not_started_after_the_wait(
    case: str, gateway: RunningGateway, event_bus: EventBus,
) -> None:
    ids = new_ids()
    others = case == "only another owner's turn is published"
    token = (gateway.token(ids.message_id, tenant_id="tenant-2") if others
             else gateway.token(ids.message_id))
    pings: list[SSEFrame] = []

    def publish_the_other_owners_turn(frame: SSEFrame) -> None:
        if frame.event == "ping":
            pings.append(frame)
            if others and len(pings) == 1:  # after the stream opened, owner unknown
                publish_turn(event_bus, ids, ["not ", "yours"], owner=OWNER)

    started = time.monotonic()
    read = read_stream(gateway.events_url(ids.message_id), token=token,
                       on_frame=publish_the_other_owners_turn)
    took = time.monotonic() - started
    wait = gateway.settings.gateway_first_event_timeout_seconds

    assert read.status == 200 and read.ended_by_server
    assert wait <= took < wait + 2
    assert read.pings >= 2
    last = read.frames[-1]
    assert last.event is None and last.id is None, "it must not move Last-Event-ID"
    assert read.events == [last.json()]
    assert {key: last.json()[key] for key in ("event", "status", "code", "message_id")} == {
        "event": "error", "status": 504, "code": "turn_not_started",
        "message_id": ids.message_id}
    assert "yours" not in "".join(frame.data for frame in read.frames)


def test_nothing_is_lost_when_the_gateways_pubsub_connection_drops_mid_turn(
    gateway: RunningGateway, event_bus: EventBus, redis_client: redis.Redis,
) -> None:
    _, publisher, url, token = live_turn(gateway, event_bus)
    name = f"agent-turn-gateway-pubsub-{gateway.process.pid}"

    def drop_the_connection_after_two(frame: SSEFrame) -> None:
        if frame.id == "2":
            [client] = [c for c in redis_client.client_list() if c["name"] == name]
            redis_client.client_kill_filter(_id=client["id"])
            for delta in ["three", "four", "five"]:  # while the gateway reconnects
                publisher.delta(delta)
                publisher.flush()
            publisher.end("onetwothreefourfive", {"usage": None})

    publisher.delta("one")
    publisher.flush()
    publisher.delta("two")
    publisher.flush()
    read = read_stream(url, token=token, on_frame=drop_the_connection_after_two)

    assert [event["seq"] for event in read.events] == [1, 2, 3, 4, 5, 6]
    assert answer_of(read.events) == "onetwothreefourfive"
    assert "pub/sub connection lost" in gateway.log_path.read_text()


def test_frames_ready_at_once_go_out_in_fewer_writes_and_resume_exactly(
    gateway: RunningGateway, event_bus: EventBus,
) -> None:
    ids = new_ids()
    record_owner(event_bus, ids.message_id)
    publisher = event_bus.turn(ids)
    for index in range(200):  # all in the log before the client comes: ready at once
        publisher.delta(f"<{index}>")
        publisher.flush()
    before = gateway.health()
    url = gateway.events_url(ids.message_id)
    token = gateway.token(ids.message_id)

    read = read_stream(url, token=token, max_events=200)
    after = gateway.health()
    resumed = read_stream(url, token=token, last_event_id=137, max_events=63)

    frames = after["frames_sent"] - before["frames_sent"]
    writes = after["writes"] - before["writes"]
    assert [event["seq"] for event in read.events] == list(range(1, 201))
    assert frames == 200 and writes <= 200 // 16, f"{frames} frames in {writes} writes"
    assert [frame.id for frame in read.frames if frame.event is None] == [
        str(seq) for seq in range(1, 201)], "each merged frame keeps its own id"
    assert [event["seq"] for event in resumed.events] == list(range(138, 201))
    assert answer_of(read.events[:137] + resumed.events) == "".join(
        f"<{index}>" for index in range(200))


@pytest.mark.parametrize("direct", [True, False], ids=["direct writes", "through send"])
def test_live_frames_to_a_prompt_client_are_written_by_the_pubsub_reader_and_resume_exactly(
    direct: bool, event_bus: EventBus, tmp_path: Path,
) -> None:
    running = start_gateway(gateway_settings(gateway_direct_writes=direct), tmp_path)
    try:
        ids, publisher, url, token = live_turn(running, event_bus)
        arrived = threading.Semaphore(0)
        before = running.health()
        with ThreadPoolExecutor(1) as pool:
            reading = pool.submit(read_stream, url, token=token,
                                  on_frame=lambda frame: arrived.release())
            publisher.delta("<0>")
            assert arrived.acquire(timeout=WAIT_SECONDS), "the first frame"
            for index in range(1, 60):  # one at a time: the client waits for each
                publisher.delta(f"<{index}>")
                publisher.flush()
                assert arrived.acquire(timeout=WAIT_SECONDS), f"frame {index}"
            publisher.end("".join(f"<{index}>" for index in range(60)), {"usage": None})
            read = reading.result(timeout=WAIT_SECONDS)
        after = running.health()
        resumed = read_stream(url, token=token, last_event_id=31)
    finally:
        stop_worker(running.process)

    assert_exactly_the_turn(read, logged(event_bus, ids.message_id))
    assert read.ended_by_server and read.events[-1]["event"] == "message_end"
    assert [event["seq"] for event in resumed.events] == list(range(32, 62))
    direct_writes = after["direct_writes"] - before["direct_writes"]
    if direct:
        assert direct_writes >= 55, "a waiting client's live frames, all but the end"
    else:
        assert direct_writes == 0
    assert after["frames_sent"] - before["frames_sent"] == 61


def test_a_stream_that_ends_with_its_turn_is_counted_apart_from_cut_ones(
    gateway: RunningGateway, event_bus: EventBus,
) -> None:
    ids = new_ids()
    publish_turn(event_bus, ids, ["done"])
    before = gateway.health()

    read_stream(gateway.events_url(ids.message_id), token=gateway.token(ids.message_id))

    # The client has the end before the gateway has closed the stream and counted it.
    ended_before = before["closed_streams"].get("turn_ended", 0)
    wait_until(lambda: gateway.health()["closed_streams"].get("turn_ended", 0) > ended_before)
    after = gateway.health()
    assert after["closed_streams"]["turn_ended"] == ended_before + 1
    assert after["cut_streams"] == before["cut_streams"]
    assert after["gc_frozen_objects"] > 10_000, "start-up objects are kept off the collector"


def test_a_stream_whose_pubsub_stays_lost_past_the_outage_bound_is_cut_with_that_cause(
    event_bus: EventBus, tmp_path: Path,
) -> None:
    proxy = TcpProxy(REDIS_PORT)
    base = gateway_settings()
    settings = gateway_settings(pubsub_url=base.pubsub_url.replace(
        f":{REDIS_PORT}/", f":{proxy.port}/"), gateway_pubsub_outage_seconds=1.0)
    running = start_gateway(settings, tmp_path)
    try:
        ids = new_ids()
        record_owner(event_bus, ids.message_id)
        event_bus.turn(ids).delta("before")
        with httpx.stream("GET", running.events_url(ids.message_id),
                          params={"token": running.token(ids.message_id)},
                          timeout=httpx.Timeout(10.0)) as response:
            lines = response.iter_lines()
            while next(lines) != "":
                pass  # the first frame: the stream is open
            proxy.cut(30)  # Redis out of reach for the gateway, past the 1 s bound
            rest = list(lines)  # the gateway ends the response: an EventSource reconnects
        assert not any('"message_end"' in line for line in rest)
        wait_until(lambda: "pubsub_not_back" in running.log_path.read_text(), timeout=10)
        log_text = running.log_path.read_text()
        health = running.health()
    finally:
        stop_worker(running.process)
        proxy.close()
    assert "pub/sub not back within 1s" in log_text
    assert "closed (pubsub_not_back" in log_text
    assert health["cut_streams"] == {"pubsub_not_back": 1}
    assert health["closed_streams"].get("turn_ended", 0) == 0


async def _read_many(urls: list[tuple[str, str]], opened: asyncio.Event,
                     opened_count: list[int]) -> list[list[dict[str, Any]]]:
    """Read many streams at once to their ends; ``opened`` is set once each had a frame."""
    limits = httpx.Limits(max_connections=len(urls), max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=httpx.Timeout(60.0), limits=limits) as client:
        async def one(url: str, token: str) -> list[dict[str, Any]]:
            events: list[dict[str, Any]] = []
            first = True
            async with client.stream("GET", url, params={"token": token}) as response:
                async for line in response.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    events.append(json.loads(line[len("data: "):]))
                    if first:
                        first = False
                        opened_count[0] += 1
                        if opened_count[0] == len(urls):
                            opened.set()
            return events

        return await asyncio.gather(*(one(url, token) for url, token in urls))


def test_five_hundred_streams_keep_every_event_when_the_pubsub_connection_is_killed(
    gateway: RunningGateway, event_bus: EventBus, redis_client: redis.Redis,
) -> None:
    turns = [new_ids() for _ in range(500)]
    for ids in turns:
        record_owner(event_bus, ids.message_id)
        publisher = event_bus.turn(ids)
        publisher.delta("one ")
        publisher.flush()
    urls = [(gateway.events_url(ids.message_id), gateway.token(ids.message_id))
            for ids in turns]
    before = gateway.health()
    loop = asyncio.new_event_loop()
    opened, count = asyncio.Event(), [0]
    try:
        reading = loop.create_task(_read_many(urls, opened, count))
        loop.run_until_complete(asyncio.wait_for(opened.wait(), 60))
        name = f"agent-turn-gateway-pubsub-{gateway.process.pid}"
        [client] = [c for c in redis_client.client_list() if c["name"] == name]
        redis_client.client_kill_filter(_id=client["id"])
        for ids in turns:  # while the gateway reconnects and every stream re-reads
            publisher = event_bus.turn(ids)
            publisher.delta("two ")
            publisher.flush()
            publisher.end("one two ", {"usage": None})
        streams = loop.run_until_complete(asyncio.wait_for(reading, 90))
    finally:
        loop.close()
    after = gateway.health()

    assert all(answer_of(events) == "one two " for events in streams)
    assert all([e["seq"] for e in events] == [1, 2, 3] for events in streams)
    assert after["cut_streams"] == before["cut_streams"], "no stream was cut"
    assert after["closed_streams"]["turn_ended"] - before["closed_streams"].get(
        "turn_ended", 0) == 500
    assert "pub/sub connection lost" in gateway.log_path.read_text()


def _resident_bytes(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines()
                    if line.startswith("VmRSS:"))) * 1024


def test_a_client_that_stops_reading_is_cut_off_and_can_resume(
    gateway: RunningGateway, event_bus: EventBus,
) -> None:
    _, publisher, url, token = live_turn(gateway, event_bus)
    closed_slow_before = gateway.health()["closed_streams"].get("client_too_slow", 0)
    chunk = "x" * 32_000
    flood = 600  # 19 MB: far more than the socket buffers (a few MB) and the client's queue
    resident_before = _resident_bytes(gateway.process.pid)

    with httpx.Client(timeout=httpx.Timeout(5.0)) as client, \
            client.stream("GET", url, params={"token": token}) as response:
        lines = response.iter_lines()
        publisher.delta("start")
        while next(lines) != "":
            pass  # the first frame; then the client reads nothing until it has been cut off
        for _ in range(flood):
            publisher.delta(chunk)
            publisher.flush()
        deadline = time.monotonic() + WAIT_SECONDS
        while gateway.health()["closed_streams"].get("client_too_slow", 0) == closed_slow_before:
            assert time.monotonic() < deadline, f"slow client still connected: {gateway.health()}"
            time.sleep(0.05)
        resident_growth = _resident_bytes(gateway.process.pid) - resident_before
        publisher.end("the end", {"usage": None})
        parser = SSEParser()
        received: list[SSEFrame] = []
        with pytest.raises(httpx.RemoteProtocolError):  # cut off: no closing chunk
            for line in lines:
                frame = parser.feed(line)
                if frame is not None and frame.event is None:
                    received.append(frame)

    assert gateway.health()["subscriptions"] == 0
    assert resident_growth < flood * len(chunk) // 2, "the gateway buffered the flood"
    last_seen = int(received[-1].id or 0)
    assert 1 < last_seen < flood
    assert all('"event":"message_end"' not in frame.data for frame in received)
    resumed = read_stream(url, token=token, last_event_id=last_seen)
    assert [event["seq"] for event in resumed.events] == list(range(last_seen + 1, flood + 3))
    assert resumed.events[-1]["event"] == "message_end"


def test_a_client_that_stops_reading_is_cut_while_a_prompt_one_on_the_same_turn_is_not(
    gateway: RunningGateway, event_bus: EventBus,
) -> None:
    _, publisher, url, token = live_turn(gateway, event_bus)
    cut_before = gateway.health()["cut_streams"].get("client_too_slow", 0)
    flood, burst, chunk = 400, 16, "y" * 32_000
    received = threading.Semaphore(0)
    publisher.delta("start")
    with ThreadPoolExecutor(1) as pool, httpx.Client(timeout=httpx.Timeout(5.0)) as client, \
            client.stream("GET", url, params={"token": token}) as slow:
        prompt = pool.submit(read_stream, url, token=token, timeout=60,
                             on_frame=lambda frame: received.release())
        lines = slow.iter_lines()
        while next(lines) != "":
            pass  # the slow client's first frame; then it reads nothing more
        assert received.acquire(timeout=WAIT_SECONDS), "the prompt client's first frame"
        # In bursts the prompt client takes in full before the next: prompt by construction,
        # however slowly this machine runs its parser, while the other falls 400 behind.
        for sent in range(0, flood, burst):
            for _ in range(burst):
                publisher.delta(chunk)
                publisher.flush()
            for _ in range(burst):
                assert received.acquire(timeout=WAIT_SECONDS), f"the prompt client at {sent}"
        wait_until(lambda: gateway.health()["cut_streams"].get("client_too_slow", 0)
                   > cut_before, timeout=WAIT_SECONDS)
        publisher.end("the end", {"usage": None})
        prompt_read = prompt.result(60)

    assert prompt_read.ended_by_server
    assert [event["seq"] for event in prompt_read.events] == list(range(1, flood + 3))
    assert gateway.health()["cut_streams"].get("client_too_slow", 0) == cut_before + 1, (
        "only the client that stopped reading was cut")


def test_a_client_whose_socket_takes_nothing_for_the_send_timeout_is_cut_off(
    gateway: RunningGateway, event_bus: EventBus,
) -> None:
    """Few but large events: the client's queue never fills, its socket does."""
    ids = new_ids()
    record_owner(event_bus, ids.message_id)
    publisher = event_bus.turn(ids)
    url = gateway.events_url(ids.message_id)
    counted_before = gateway.health()["closed_streams"].get("send_timeout", 0)
    events = gateway.settings.gateway_client_buffer_events // 2
    chunk = "y" * 256_000  # 8 MB in all: more than the socket buffers hold

    with httpx.Client(timeout=httpx.Timeout(5.0)) as client, \
            client.stream("GET", url, params={"token": gateway.token(ids.message_id)}) as response:
        lines = response.iter_lines()
        publisher.delta("start")
        while next(lines) != "":
            pass
        for _ in range(events):
            publisher.delta(chunk)
            publisher.flush()
        deadline = time.monotonic() + gateway.settings.gateway_send_timeout_seconds + 10
        while gateway.health()["closed_streams"].get("send_timeout", 0) == counted_before:
            assert time.monotonic() < deadline, f"stalled client connected: {gateway.health()}"
            time.sleep(0.05)

    assert gateway.health()["subscriptions"] == 0


# HEAD and the log ----------------------------------------------------------------------------


def test_head_answers_at_once_with_the_streams_headers_and_opens_no_stream(
    gateway: RunningGateway,
) -> None:
    ids = new_ids()  # a turn that has published nothing: a GET would wait for it
    url = gateway.events_url(ids.message_id)
    before = gateway.health()

    head = answer_to("HEAD", url, params={"token": gateway.token(ids.message_id)})
    no_token = answer_to("HEAD", url)
    bad_resume_point = answer_to("HEAD", url, params={"token": gateway.token(ids.message_id),
                                                      "after": "+2"})
    after = gateway.health()

    assert head.status == 200 and head.body == b""
    assert head.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert head.headers["cache-control"] == "no-cache"
    assert head.headers["x-accel-buffering"] == "no"
    assert head.seconds < gateway.settings.gateway_ping_interval_seconds
    assert (no_token.status, no_token.body) == (401, b"")
    assert no_token.headers["www-authenticate"].startswith("Bearer")
    assert (bad_resume_point.status, bad_resume_point.body) == (400, b"")
    assert after["open_streams"] == before["open_streams"]
    assert after["closed_streams"] == before["closed_streams"]


def test_request_values_cannot_forge_a_line_of_the_gateways_log_or_flood_it(
    gateway: RunningGateway,
) -> None:
    forged = "2026-01-01 CRITICAL forged"
    prefix = f"msg-{uuid.uuid4().hex[:8]}"
    crlf_id = f"{prefix}\r\n{forged}"  # what the path below decodes to
    crlf_url = f"{gateway.url}/v1/turns/{prefix}%0D%0A{forged.replace(' ', '%20')}/events"
    # Long enough to be cut in the log, short enough that the request line fits in one read:
    # a server that refuses before it has read a 60 KB request line resets the connection.
    long_id = "m" * 6_000
    token = gateway.token(crlf_id, user_id=f"user-1\r\n{forged} by the user")

    refused = answer_to("GET", crlf_url)
    with httpx.stream("GET", crlf_url, params={"token": token},
                      timeout=httpx.Timeout(5.0)) as response:
        assert response.status_code == 200
        next(response.iter_lines())  # the first ping: the stream is open; then hang up
    long_refused = answer_to("GET", gateway.events_url(long_id))
    escaped_id = f"{prefix}\\x0d\\x0a{forged}"
    closed = f"stream of turn {escaped_id} for user user-1\\x0d\\x0a{forged} by the user closed"
    wait_until(lambda: closed in gateway.log_path.read_text())

    lines = gateway.log_path.read_text().split("\n")
    assert (refused.status, long_refused.status) == (401, 401)
    assert not [line for line in lines if line.lstrip("\r").startswith(forged)]
    assert any(f"stream of turn {escaped_id} refused: token_missing" in line for line in lines)
    assert any(f"{'m' * 512}…(+{6_000 - 512} chars) refused" in line for line in lines)
    assert max(len(line) for line in lines) < 5_000


# Answers through the gateway ------------------------------------------------------------------


def answers_url(gateway: RunningGateway, message_id: str) -> str:
    return f"{gateway.url}/v1/turns/{message_id}/human-input"


def post_answer(gateway: RunningGateway, message_id: str, body: Any = None, *,
                token: str | None, content: bytes | Iterator[bytes] | None = None,
                in_query: bool = False) -> httpx.Response:
    """POST an answer with a stream token as a browser does: a Bearer header, or ?token=."""
    headers = {"Authorization": f"Bearer {token}"} if token and not in_query else {}
    params = {"token": token} if token and in_query else {}
    return httpx.post(answers_url(gateway, message_id), json=body, content=content,
                      headers=headers, params=params, timeout=httpx.Timeout(10.0))


def refusal(response: httpx.Response) -> tuple[int, str]:
    body = response.json()
    assert body["status"] == response.status_code and body["message"]
    return response.status_code, body["code"]


def record_question(bus: EventBus, message_id: str, *, expires_in: float = 600.0) -> None:
    """A message waiting for an answer to ``call_1``, recorded as the worker records it."""
    from worker.questions import question_from_call

    record_owner(bus, message_id)
    question = question_from_call(
        {"tool_call_id": "call_1", "tool_name": "ask_human", "args": {"question": "Sure?"}},
        run_id="run-1", message_id=message_id)
    expires_at = datetime.now(UTC) + timedelta(seconds=expires_in)
    bus.record_question(message_id, question.record(expires_at, tenant_id="tenant-1",
                                                    app_id="app-1", user_id="user-1"),
                        ttl_seconds=600)


def ask_and_read(gateway: RunningGateway, pool: ThreadPoolExecutor, token: str,
                 message_id: str) -> tuple[Any, dict[str, Any]]:
    """Read the turn's stream in the background until it asks; the read and the question."""
    asked = threading.Event()
    question: dict[str, Any] = {}

    def on_frame(frame: SSEFrame) -> None:
        if frame.event is None and frame.json()["event"] == "human_input_required":
            question.update(frame.json())
            asked.set()

    read = pool.submit(read_stream, gateway.events_url(message_id), token=token,
                       on_frame=on_frame)
    assert asked.wait(WAIT_SECONDS), "the turn did not ask"
    return read, question


@SQLITE_WORKER
def test_an_answer_posted_with_the_stream_token_resumes_the_turn_on_the_open_stream(
    celery_worker: RunningWorker, stub: StubControl, listen: Any, producer_app: Any,
    gateway: RunningGateway,
) -> None:
    turn = make_turn(query="CALL_TOOL:ask_human through the gateway")
    listener = listen(turn["message_id"])
    submitted = submit_turn(turn, celery_app=producer_app, settings=gateway.settings)

    with ThreadPoolExecutor(1) as pool:
        read, asked = ask_and_read(gateway, pool, submitted.stream_token, turn["message_id"])
        posted = post_answer(gateway, turn["message_id"],
                             {"tool_call_id": asked["tool_call_id"], "action": "submit",
                              "values": {"answer": "yes"}}, token=submitted.stream_token)
        stream = read.result(WAIT_SECONDS)
    truth = listener.wait_for_end()

    assert posted.status_code == 202 and posted.json()["task_id"]
    assert_exactly_the_turn(stream, truth)
    assert [event["event"] for event in truth].count("message_end") == 1
    assert truth[-1]["task_id"] == posted.json()["task_id"], "the continuation ended it"
    assert truth[-1]["answer"] == ('Tool ask_human said: {"status":"submitted","action":'
                                   '{"id":"submit","label":"Submit"},"values":{"answer":"yes"}}')
    assert f"answer to turn {turn['message_id']} from user user-1 enqueued" in (
        gateway.log_path.read_text())


def _sequence(events: list[dict[str, Any]]) -> list[str]:
    """The events as a client got them, runs of one kind (and step) folded: 'agent_message x12'."""
    names = [f"agent_thought {e['position']} ({e['tool'] or 'thinking'})"
             if e["event"] == "agent_thought" else e["event"] for e in events]
    folded: list[list[Any]] = []
    for name in names:
        if folded and folded[-1][0] == name:
            folded[-1][1] += 1
        else:
            folded.append([name, 1])
    return [name if count == 1 else f"{name} x{count}" for name, count in folded]


def _log_bytes(settings: Settings, message_id: str) -> int:
    client = redis.Redis.from_url(settings.pubsub_url, socket_timeout=5)
    try:
        return int(client.memory_usage(replay_log_key(message_id), samples=0) or 0)
    finally:
        client.close()


@SQLITE_WORKER
def test_a_tool_turn_and_a_question_reach_a_gateway_client_in_the_order_they_happened(
    celery_worker: RunningWorker, stub: StubControl, producer_app: Any,
    gateway: RunningGateway,
) -> None:
    tool_turn = make_turn(query="THINK, then CALL_TOOL:lookup")
    with ThreadPoolExecutor(1) as pool:  # the client is there before the turn starts
        open_before = gateway.health()["open_streams"]
        reading = pool.submit(read_stream, gateway.events_url(tool_turn["message_id"]),
                              token=gateway.token(tool_turn["message_id"]))
        # Open before the turn starts: a client that comes after the end reads the compacted
        # log, whose seqs have gaps by design (docs/contract.md).
        wait_until(lambda: gateway.health()["open_streams"] > open_before, timeout=WAIT_SECONDS)
        sent = submit_turn(tool_turn, celery_app=producer_app, settings=gateway.settings)
        tool_events = reading.result(WAIT_SECONDS).events
    ask_turn = make_turn(query="THINK, then CALL_TOOL:ask_human")
    asked_sent = submit_turn(ask_turn, celery_app=producer_app, settings=gateway.settings)
    with ThreadPoolExecutor(1) as pool:
        read, asked = ask_and_read(gateway, pool, asked_sent.stream_token,
                                   ask_turn["message_id"])
        post_answer(gateway, ask_turn["message_id"],
                    {"tool_call_id": asked["tool_call_id"], "action": "submit",
                     "values": {"answer": "yes"}}, token=asked_sent.stream_token)
        ask_events = read.result(WAIT_SECONDS).events

    tool_sequence, ask_sequence = _sequence(tool_events), _sequence(ask_events)
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "agent-turn-sequences.json").write_text(json.dumps({
        "tool_turn": {"events": len(tool_events), "sequence": tool_sequence,
                      "replay_log_bytes": _log_bytes(gateway.settings, sent.message_id)},
        "ask_human_turn": {"events": len(ask_events), "sequence": ask_sequence,
                           "replay_log_bytes": _log_bytes(gateway.settings,
                                                          ask_turn["message_id"])},
    }, indent=2, ensure_ascii=False))
    for events in (tool_events, ask_events):
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
        assert [e["event"] for e in events].count("message_end") == 1
        assert events[-1]["event"] == "message_end"
    # One step grows: its thinking, then its tool call (and the tool's refusal), then text.
    assert tool_sequence[0].startswith("agent_thought 1 (thinking)")
    assert any(name.startswith("agent_thought 1 (lookup)") for name in tool_sequence)
    assert tool_sequence[-2].startswith("agent_message") and tool_sequence[-1] == "message_end"
    # The question ends the first leg; the continuation goes on on the same stream.
    question_at = ask_sequence.index("human_input_required")
    assert any(n.startswith("agent_thought 1 (ask_human)") for n in ask_sequence[:question_at])
    assert ask_sequence[question_at + 1:][-1] == "message_end"
    assert any(n.startswith("agent_message") for n in ask_sequence[question_at + 1:])


def ask(gateway: RunningGateway, listen: Any, producer_app: Any,
        query: str) -> tuple[dict[str, Any], TurnListener, Any, dict[str, Any]]:
    """Send a turn that asks its user; wait for the question. The turn, its listener, what
    ``submit_turn`` returned, and an answer to the question with its one action."""
    turn = make_turn(query=query)
    listener = listen(turn["message_id"])
    submitted = submit_turn(turn, celery_app=producer_app, settings=gateway.settings)
    asked = listener.wait_for("human_input_required")
    return turn, listener, submitted, {"tool_call_id": asked["tool_call_id"],
                                       "action": "submit", "values": {}}


@SQLITE_WORKER
def test_a_second_answer_to_the_same_question_is_refused_with_409(
    celery_worker: RunningWorker, stub: StubControl, listen: Any, producer_app: Any,
    gateway: RunningGateway,
) -> None:
    turn, listener, submitted, answer = ask(gateway, listen, producer_app,
                                            "CALL_TOOL:ask_human twice")

    first = post_answer(gateway, turn["message_id"], answer, token=submitted.stream_token)
    second = post_answer(gateway, turn["message_id"], answer, token=submitted.stream_token)
    truth = listener.wait_for_end()

    assert first.status_code == 202
    assert refusal(second) == (409, "human_input_refused")
    assert [event["event"] for event in truth].count("message_end") == 1
    assert len(stub.runs(turn["message_id"])) == 2, "the question's run and one continuation"


@SQLITE_WORKER
def test_an_answer_with_another_owners_token_is_refused_and_the_question_stays_open(
    celery_worker: RunningWorker, stub: StubControl, listen: Any, producer_app: Any,
    gateway: RunningGateway,
) -> None:
    turn, listener, submitted, answer = ask(gateway, listen, producer_app,
                                            "CALL_TOOL:ask_human who are you")

    intruder = post_answer(gateway, turn["message_id"], answer,
                           token=gateway.token(turn["message_id"], tenant_id="tenant-2"))
    unknown = post_answer(gateway, "msg-nobody-asked", answer,
                          token=gateway.token("msg-nobody-asked", tenant_id="tenant-2"))
    other_turn = post_answer(gateway, turn["message_id"], answer,
                             token=gateway.token("msg-another-one"))
    no_token = post_answer(gateway, turn["message_id"], answer, token=None)
    still_waiting = celery_worker.store.get_message(turn["message_id"])
    owner = post_answer(gateway, turn["message_id"], answer, token=submitted.stream_token,
                        in_query=True)
    truth = listener.wait_for_end()

    assert refusal(intruder) == (409, "human_input_refused")
    assert intruder.json() == unknown.json(), "it must not tell the message exists"
    assert refusal(other_turn) == (403, "token_wrong_turn")
    assert refusal(no_token) == (401, "token_missing")
    assert still_waiting is not None and still_waiting.status == "awaiting_input"
    assert owner.status_code == 202
    assert truth[-1]["event"] == "message_end"
    assert len(stub.runs(turn["message_id"])) == 2, "only the owner's answer ran"


NOT_AN_ANSWER: dict[str, bytes] = {
    "not JSON": b"tool_call_id=call_1&action=submit",
    "not UTF-8": b'{"tool_call_id": "call_1", "action": "\xff"}',
    "a list": b'[{"tool_call_id": "call_1", "action": "submit"}]',
    "an unknown field": b'{"tool_call_id": "call_1", "action": "submit", "tenant_id": "t"}',
    "no action": b'{"tool_call_id": "call_1"}',
    "a number as action": b'{"tool_call_id": "call_1", "action": 5}',
    "values not an object": b'{"tool_call_id": "call_1", "action": "submit", "values": "yes"}',
    "NaN in values": b'{"tool_call_id": "call_1", "action": "submit", "values": {"a": NaN}}',
    "values nested deep": b'{"tool_call_id": "call_1", "action": "submit", "values": '
                          + b'{"a": ' * 5 + b"1" + b"}" * 6,
    "nesting past the parser": b"[" * 10_000 + b"]" * 10_000,
    "values over the limit, body within": json.dumps(
        {"tool_call_id": "call_1", "action": "submit",
         "values": {"a": "x" * (16 * 1024)}}).encode(),
}


@pytest.mark.parametrize("case", list(NOT_AN_ANSWER))
def test_a_body_that_is_not_an_answer_is_a_bad_request_and_claims_nothing(
    case: str, gateway: RunningGateway, event_bus: EventBus,
) -> None:
    ids = new_ids()
    record_question(event_bus, ids.message_id)

    response = post_answer(gateway, ids.message_id, content=NOT_AN_ANSWER[case],
                           token=gateway.token(ids.message_id))

    assert refusal(response) == (400, "invalid_param")
    assert len(response.content) < 2_000
    assert not event_bus.redis.exists(answered_key(ids.message_id, "call_1"))


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_a_body_over_the_limit_is_refused_with_413_before_it_is_read(
    declared: bool, gateway: RunningGateway, event_bus: EventBus,
) -> None:
    ids = new_ids()
    record_question(event_bus, ids.message_id)
    oversize = b'{"tool_call_id": "call_1", "action": "submit", "values": {"a": "' \
        + b"x" * 2_000_000 + b'"}}'

    def in_pieces() -> Iterator[bytes]:
        for start in range(0, len(oversize), 16_384):
            yield oversize[start:start + 16_384]

    response = post_answer(gateway, ids.message_id, token=gateway.token(ids.message_id),
                           content=oversize if declared else in_pieces())

    assert refusal(response) == (413, "payload_too_large")
    assert not event_bus.redis.exists(answered_key(ids.message_id, "call_1"))
    assert gateway.health()["redis_connected"], "the gateway is still serving"


def test_an_answer_to_a_message_that_is_not_waiting_is_refused_with_409(
    gateway: RunningGateway, event_bus: EventBus,
) -> None:
    finished = new_ids()
    publish_turn(event_bus, finished, ["no question asked"])
    answer = {"tool_call_id": "call_1", "action": "submit", "values": {}}

    response = post_answer(gateway, finished.message_id, answer,
                           token=gateway.token(finished.message_id))

    assert refusal(response) == (409, "human_input_refused")


def test_an_answer_after_the_questions_expiry_is_refused_with_410(
    gateway: RunningGateway, event_bus: EventBus,
) -> None:
    ids = new_ids()
    record_question(event_bus, ids.message_id, expires_in=-1)

    response = post_answer(gateway, ids.message_id,
                           {"tool_call_id": "call_1", "action": "submit", "values": {}},
                           token=gateway.token(ids.message_id))

    assert refusal(response) == (410, "human_input_expired")
    assert not event_bus.redis.exists(answered_key(ids.message_id, "call_1"))


# The demo page in a browser -----------------------------------------------------------------


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.fail("Chromium is not installed: the demo page test needs it. Run scripts/install "
                "(it installs Chromium when missing) or apt-get install -y chromium.")


# What Chromium needs to run headless here (as root, in a container, offline), and nothing of
# its own traffic: no sync, updates or background requests.
CHROMIUM_ARGS = ("--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-dev-shm-usage")


def _run_chromium(url: str, *actions: str, timeout: float = 40.0) -> str:
    with tempfile.TemporaryDirectory() as profile:
        completed = subprocess.run(
            [_chromium(), "--headless", *CHROMIUM_ARGS, f"--user-data-dir={profile}",
             "--window-size=900,700", "--virtual-time-budget=15000", *actions, url],
            capture_output=True, text=True, timeout=timeout,
            env={**os.environ, "HOME": profile})
    assert completed.returncode == 0, completed.stderr[-2000:]
    return completed.stdout


@SQLITE_WORKER
def test_the_demo_page_shows_the_turn_streaming_in_a_browser(
    celery_worker: RunningWorker, stub: StubControl, listen: Any, producer_app: Any,
    gateway: RunningGateway,
) -> None:
    turn = make_turn(query="show me in a browser")
    stub.plan(turn["message_id"], answer_tokens=30, token_delay=0.03)
    listener = listen(turn["message_id"])
    submitted = submit_turn(turn, celery_app=producer_app, settings=gateway.settings)
    page = (f"{gateway.url}/demo?message_id={submitted.message_id}"
            f"&token={submitted.stream_token}")

    wait_for_count(listener, 3)
    dom = _run_chromium(page, "--dump-dom")  # joins mid-turn; returns once the stream ended
    truth = listener.wait_for_end()
    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "gateway-demo.png"
    screenshot.unlink(missing_ok=True)
    _run_chromium(page, f"--screenshot={screenshot}")

    answer = truth[-1]["answer"]
    assert answer.startswith("[turn 1] You said: show me in a browser.")
    assert f'<div id="answer">{answer}</div>' in dom
    # A browser that came after the end got the compacted log: fewer events, the same end.
    shown = re.search(r"done: (\d+) events, last seq (\d+)", dom)
    assert shown is not None and int(shown[2]) == truth[-1]["seq"]
    assert 2 <= int(shown[1]) <= len(truth)
    assert screenshot.stat().st_size > 10_000


@dataclass
class DemoPage:
    """The demo page in a real browser (Playwright driving Chromium), and what it did: the
    requests it made, the script errors and dialogs it met (an escaped page has none)."""

    page: Page
    requests: list[str] = field(default_factory=list)
    script_errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)

    def open(self, gateway: RunningGateway, message_id: str, token: str) -> None:
        self.page.goto(f"{gateway.url}/demo?message_id={message_id}&token={token}")

    def wait_until_ended(self) -> None:
        from playwright.sync_api import expect

        expect(self.page.locator("#status")).to_have_attribute("data-state", "ended")

    @property
    def stream_requests(self) -> list[str]:
        return [url for url in self.requests if "/events" in url]

    def steps(self) -> list[dict[str, str | None]]:
        """Each step as the page shows it, in the page's order, opened first (a click on its
        summary, as a reader would)."""
        from playwright.sync_api import expect

        shown = []
        for box in self.page.locator("#steps details").all():
            box.locator("summary").click()
            expect(box).to_have_attribute("open", "")
            fields = {name: box.locator(f"pre.{name}").all_text_contents()
                      for name in ("thought", "tool-input", "observation")}
            shown.append({"id": box.get_attribute("data-step-id"),
                          "summary": box.locator("summary").text_content(),
                          **{name: (texts[0] if texts else None)
                             for name, texts in fields.items()}})
        return shown

    def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / name
        path.unlink(missing_ok=True)
        self.page.screenshot(path=str(path), full_page=True)
        return path


# Run in the page before its own script: counts the EventSource objects the page makes.
COUNT_EVENT_SOURCES = """
window.eventSourcesOpened = 0;
window.EventSource = class extends window.EventSource {
  constructor(...args) { super(...args); window.eventSourcesOpened += 1; }
};
"""


@pytest.fixture
def demo_page() -> Iterator[DemoPage]:
    """A fresh headless Chromium with the demo page's tab; every wait in it is bounded.

    Playwright is imported here, not with the module, so that the other gateway tests run in
    a virtualenv made before it was a dev dependency; these two then say what to do.
    """
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        pytest.fail("Playwright is not installed: the demo page tests need it. Run "
                    "scripts/install (pip install -e '.[dev]').")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=_chromium(), args=CHROMIUM_ARGS,
                                             timeout=30_000)
        try:
            page = browser.new_page(viewport={"width": 900, "height": 700})
            page.set_default_timeout(WAIT_SECONDS * 1000)
            page.add_init_script(COUNT_EVENT_SOURCES)
            expect.set_options(timeout=WAIT_SECONDS * 1000)
            shown = DemoPage(page)
            page.on("request", lambda request: shown.requests.append(request.url))
            page.on("pageerror", lambda error: shown.script_errors.append(str(error)))
            page.on("dialog", lambda dialog: (shown.dialogs.append(dialog.message),
                                              dialog.dismiss()))
            yield shown
        finally:
            browser.close()


def last_of_each_step(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The steps a client holds at the end: the newest version of each id, by position."""
    steps: dict[str, dict[str, Any]] = {}
    for event in events:
        if event["event"] == "agent_thought":
            steps[event["id"]] = event
    return sorted(steps.values(), key=lambda step: step["position"])


def as_the_page_shows(step: dict[str, Any]) -> dict[str, str | None]:
    title = f"tool: {step['tool']}" if step["tool"] else "thinking"
    tool_input = json.dumps(json.loads(step["tool_input"]), indent=2, ensure_ascii=False) \
        if step["tool"] else None
    return {"id": step["id"], "summary": f"Step {step['position']} · {title}",
            "thought": step["thought"] or None, "tool-input": tool_input,
            "observation": step["observation"] or None}


@SQLITE_WORKER
def test_the_demo_page_shows_each_step_once_with_its_tool_and_keeps_them_out_of_the_answer(
    celery_worker: RunningWorker, stub: StubControl, listen: Any, producer_app: Any,
    gateway: RunningGateway, demo_page: DemoPage,
) -> None:
    hostile = "<img src=x onerror=alert(document.domain)>"
    turn = make_turn(query=f"THINK, then CALL_TOOL:lookup the {hostile} tag")
    stub.plan(turn["message_id"], answer_tokens=20, token_delay=0.02)
    listener = listen(turn["message_id"])
    submitted = submit_turn(turn, celery_app=producer_app, settings=gateway.settings)

    demo_page.open(gateway, submitted.message_id, submitted.stream_token)
    demo_page.wait_until_ended()
    truth = listener.wait_for_end()
    steps = last_of_each_step(truth)
    shown = demo_page.steps()
    screenshot = demo_page.screenshot("gateway-demo-steps.png")

    page = demo_page.page
    answer = truth[-1]["answer"]
    assert [step["tool"] for step in steps if step["tool"]] == ["lookup"]
    assert any(step["thought"] for step in steps)
    sent = [event for event in truth if event["event"] == "agent_thought"]
    assert len(sent) > len(steps), "a step was sent again as it grew, and replaced in place"
    assert shown == [as_the_page_shows(step) for step in steps]
    assert hostile in "".join(str(step["tool-input"]) for step in shown)
    assert page.locator("#answer").text_content() == answer
    assert answer.startswith("[turn 1] You said: THINK, then CALL_TOOL:lookup")
    assert not [text for step in steps for text in (step["thought"], step["observation"])
                if text and text.strip() in answer], "no step text in the answer"
    assert page.locator("#status").text_content() == (
        f"done: {len(truth)} events, last seq {truth[-1]['seq']}")
    assert page.locator("img").count() == 0
    assert (demo_page.dialogs, demo_page.script_errors) == ([], [])
    assert screenshot.stat().st_size > 10_000


@SQLITE_WORKER
def test_the_demo_page_answers_the_agents_question_and_streams_the_rest_on_the_same_page(
    celery_worker: RunningWorker, stub: StubControl, listen: Any, producer_app: Any,
    gateway: RunningGateway, demo_page: DemoPage,
) -> None:
    from playwright.sync_api import expect

    question = {"title": "Ship it?", "question": "Deploy <b>v2</b> to production?",
                "markdown": "**now** or never",
                "fields": [{"name": "note", "label": "Note", "type": "paragraph"}],
                "actions": [{"id": "approve", "label": "Approve", "style": "primary"},
                            {"id": "reject", "label": "Reject", "style": "destructive"}],
                "urgency": "high"}
    turn = make_turn(query="deploy it")
    stub.plan(turn["message_id"], process=[
        {"thinking": "Ask first."},
        {"ask_human": question},
        {"tool": "deploy", "args": {"env": "prod"}, "result": "deployed v2"},
    ])
    listener = listen(turn["message_id"])
    submitted = submit_turn(turn, celery_app=producer_app, settings=gateway.settings)

    demo_page.open(gateway, submitted.message_id, submitted.stream_token)
    page = demo_page.page
    form = page.locator("#question")
    expect(form).to_be_visible()
    expect(page.locator("#status")).to_have_attribute("data-state", "waiting")
    asked_on_page = {"title": form.locator("h2").text_content(),
                     "question": form.locator(".question").text_content(),
                     "markdown": form.locator(".markdown").text_content(),
                     "buttons": form.locator("button").all_text_contents()}
    form.get_by_label("Note").fill("go <b>now</b>")
    form.get_by_role("button", name="Approve").click()
    expect(page.locator("#question-result")).to_have_attribute("data-state", "sent")
    for control in form.locator("button, textarea").all():
        expect(control).to_be_disabled()  # answered: the form takes no second answer
    demo_page.wait_until_ended()
    truth = listener.wait_for_end()
    shown = demo_page.steps()
    screenshot = demo_page.screenshot("gateway-demo-ask-human.png")

    end = truth[-1]
    assert asked_on_page == {"title": "Ship it?", "question": "Deploy <b>v2</b> to production?",
                             "markdown": "**now** or never", "buttons": ["Approve", "Reject"]}
    assert end["event"] == "message_end"
    assert [event["event"] for event in truth].count("message_end") == 1
    assert [event["event"] for event in truth].count("human_input_required") == 1
    assert end["answer"] == ('Tool ask_human said: {"status":"submitted","action":'
                             '{"id":"approve","label":"Approve"},'
                             '"values":{"note":"go <b>now</b>"}}')
    assert page.locator("#answer").text_content() == end["answer"]
    assert page.locator("#status").text_content() == (
        f"done: {len(truth)} events, last seq {end['seq']}")
    # One EventSource for the whole message. It may have reconnected by itself, with
    # Last-Event-ID (a loaded machine can get it cut off as a slow client): still that one.
    assert page.evaluate("window.eventSourcesOpened") == 1
    assert {url.partition("?")[0] for url in demo_page.stream_requests} == {
        gateway.events_url(turn["message_id"])}
    assert shown == [as_the_page_shows(step) for step in last_of_each_step(truth)]
    asked, deployed = shown  # the thought and the question it led to make one step
    assert (asked["summary"], asked["thought"]) == ("Step 1 · tool: ask_human", "Ask first.")
    assert '"note":"go <b>now</b>"' in str(asked["observation"]), "completed by the answer"
    assert (deployed["summary"], deployed["observation"]) == (
        "Step 2 · tool: deploy", "deployed v2")
    assert page.locator("b").count() == 0
    assert (demo_page.dialogs, demo_page.script_errors) == ([], [])
    assert screenshot.stat().st_size > 10_000


def test_the_demo_page_is_served(gateway: RunningGateway) -> None:
    response = httpx.get(f"{gateway.url}/demo", timeout=5)

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "new EventSource(" in response.text


# Dify's web client reading the gateway -------------------------------------------------------


@dataclass
class DifyClientView:
    """What Dify's web chat client (``handleStream`` in web/service/base.ts) makes of a stream:
    it reads ``data:`` lines only, and of each frame the fields below."""

    answer: str = ""
    message_ids: list[Any] = field(default_factory=list)
    thoughts: dict[str, dict[str, Any]] = field(default_factory=dict)
    ended: dict[str, Any] | None = None
    errored: dict[str, Any] | None = None
    task_ids: set[Any] = field(default_factory=set)
    conversation_ids: set[Any] = field(default_factory=set)


def read_as_difys_client(url: str, token: str) -> DifyClientView:
    view = DifyClientView()
    with httpx.stream("GET", url, params={"token": token},
                      timeout=httpx.Timeout(WAIT_SECONDS)) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            frame = json.loads(line[len("data: "):])
            event = frame.get("event")
            view.task_ids.add(frame.get("task_id"))
            view.conversation_ids.add(frame.get("conversation_id"))
            if event in ("message", "agent_message"):
                view.answer += frame.get("answer", "")
                view.message_ids.append(frame.get("id"))
            elif event == "message_replace":  # its onMessageReplace: the answer, replaced
                view.answer = frame.get("answer", "")
                view.message_ids.append(frame.get("id"))
            elif event == "agent_thought":
                view.thoughts[frame.get("id")] = frame
            elif event == "message_end":
                view.ended = frame
                view.message_ids.append(frame.get("id"))
            elif event == "error":
                view.errored = {"status": frame.get("status"), "code": frame.get("code"),
                                "id": frame.get("id")}
    return view


@SQLITE_WORKER
@pytest.mark.parametrize("query", ["hi there", "CALL_TOOL:lookup please"])
def test_difys_web_client_assembles_the_answer_and_takes_message_ids_from_id(
    query: str, celery_worker: RunningWorker, stub: StubControl, producer_app: Any,
    gateway: RunningGateway,
) -> None:
    turn = make_turn(query=query)
    submitted = submit_turn(turn, celery_app=producer_app, settings=gateway.settings)

    view = read_as_difys_client(gateway.events_url(turn["message_id"]), submitted.stream_token)

    assert view.ended is not None and view.errored is None
    assert view.answer == view.ended["answer"] == f"[turn 1] You said: {query}."
    assert set(view.message_ids) == {turn["message_id"]}, "every frame names the message"
    assert view.task_ids == {submitted.task_id}
    assert view.conversation_ids == {turn["conversation_id"]}
    assert all(thought["message_id"] == turn["message_id"] for thought in view.thoughts.values())
    if "CALL_TOOL" in query:
        [step] = view.thoughts.values()
        assert (step["tool"], step["observation"]) == (
            "lookup", "Unknown tool name: 'lookup'. No tools available.")
        assert step["id"] != turn["message_id"]


@SQLITE_WORKER
def test_difys_web_client_sees_a_failed_turn_as_an_error_with_its_status_and_code(
    celery_worker: RunningWorker, stub: StubControl, producer_app: Any,
    gateway: RunningGateway,
) -> None:
    turn = make_turn()
    stub.plan(turn["message_id"], fail={"reason": "InvokeBadRequestError", "error": "bad"})
    submitted = submit_turn(turn, celery_app=producer_app, settings=gateway.settings)

    view = read_as_difys_client(gateway.events_url(turn["message_id"]), submitted.stream_token)

    assert view.ended is None
    assert view.errored == {"status": 400, "code": "model_error", "id": turn["message_id"]}


@contextlib.asynccontextmanager
async def subscribed_hub(settings: Settings, channel: str,
                         **options: Any) -> AsyncIterator[Subscription]:
    """An in-process pub/sub hub on real Redis, connected and subscribed to ``channel``; what
    the caller does inside is bounded by ``WAIT_SECONDS`` too."""
    from gateway.relay import PubSubHub

    hub = PubSubHub(settings.pubsub_url, **options)
    hub.start()
    try:
        async with asyncio.timeout(WAIT_SECONDS):
            while not hub.connected:
                await asyncio.sleep(0.01)
            subscription = await hub.subscribe([channel], buffer_events=64)
            assert await subscription.wait_ready(WAIT_SECONDS)
            yield subscription
    finally:
        await hub.stop()


def publish_deltas(publisher: TurnPublisher, count: int) -> None:
    """``count`` deltas, each published on its own."""
    for index in range(count):
        publisher.delta(f"<{index}>")
        publisher.flush()


async def received_seqs(subscription: Subscription, channel: str, count: int) -> list[int]:
    """The seqs of the next ``count`` events the subscription gets, each from ``channel``."""
    seqs = []
    while len(seqs) < count:
        item = await subscription.get()
        assert isinstance(item, tuple) and item[0] == channel
        seqs.append(item[1].seq)
    return seqs


@pytest.mark.parametrize("parser", ["hiredis", "redis-py"])
def test_the_pubsub_hub_hands_every_message_to_its_subscribers_in_order(
    parser: str, event_bus: EventBus, monkeypatch: pytest.MonkeyPatch,
) -> None:
    import gateway.relay

    if parser == "redis-py":
        monkeypatch.setattr(gateway.relay, "hiredis", None)
    settings = gateway_settings()
    ids = new_ids()
    channel = settings.channel_for(ids.message_id)

    async def scenario() -> list[int]:
        async with subscribed_hub(settings, channel, health_check_seconds=1.0) as subscription:
            publish_deltas(event_bus.turn(ids), 5)
            return await received_seqs(subscription, channel, 5)

    assert asyncio.run(scenario()) == [1, 2, 3, 4, 5]


def test_live_copies_of_events_a_stream_holds_from_its_log_are_not_queued(
    event_bus: EventBus,
) -> None:
    """A resumed stream that read a page of its log while pub/sub lagged behind would
    otherwise queue the live copies of that page too, and be cut as slow for them."""
    settings = gateway_settings()
    ids = new_ids()
    channel = settings.channel_for(ids.message_id)

    async def scenario() -> tuple[list[int], bool]:
        async with subscribed_hub(settings, channel, health_check_seconds=30.0) as subscription:
            held = 80  # more than the subscription's bound of 64
            subscription.held_through(channel, held)
            publish_deltas(event_bus.turn(ids), held + 3)
            return await received_seqs(subscription, channel, 3), subscription.overflowed

    seqs, overflowed = asyncio.run(scenario())

    assert not overflowed
    assert seqs == [81, 82, 83]


def test_a_busy_pubsub_connection_is_read_once_per_batch_and_a_quiet_one_at_once(
    event_bus: EventBus,
) -> None:

    settings = gateway_settings()
    ids = new_ids()
    channel = settings.channel_for(ids.message_id)
    batch = 0.5

    async def scenario() -> tuple[float, float, list[int]]:
        loop = asyncio.get_running_loop()
        async with subscribed_hub(settings, channel, health_check_seconds=30.0,
                                  read_batch_seconds=batch) as subscription:
            await asyncio.sleep(batch)  # the connection has been quiet for a batch
            publisher = event_bus.turn(ids)
            sent = loop.time()
            publisher.delta("quiet")
            publisher.flush()
            first = await subscription.get()
            first_after = loop.time() - sent
            for index in range(3):  # a burst right after a read: read together, later
                publisher.delta(f"<{index}>")
                publisher.flush()
            seqs = [first[1].seq]  # type: ignore[index]
            while len(seqs) < 4:
                item = await subscription.get()
                assert isinstance(item, tuple)
                seqs.append(item[1].seq)
            return first_after, loop.time() - sent, seqs

    first_after, burst_after, seqs = asyncio.run(scenario())

    assert seqs == [1, 2, 3, 4]
    assert first_after < batch, "a message on a quiet connection is read at once"
    assert burst_after >= batch * 0.9, "messages right after a read wait for the batch"


def test_a_saturated_pubsub_reader_stops_pausing_and_reads_as_messages_come(
    event_bus: EventBus, monkeypatch: pytest.MonkeyPatch,
) -> None:
    import gateway.relay

    monkeypatch.setattr(gateway.relay, "_BUSY_SECONDS", 30.0)
    settings = gateway_settings()
    ids = new_ids()
    channel = settings.channel_for(ids.message_id)
    batch = 0.3

    async def scenario() -> float:
        loop = asyncio.get_running_loop()
        publisher = event_bus.turn(ids)

        def publish(text: str) -> None:
            publisher.delta(text)
            publisher.flush()

        async with subscribed_hub(settings, channel, health_check_seconds=30.0,
                                  read_batch_seconds=batch) as subscription:
            await asyncio.sleep(batch)
            publish("first")
            await subscription.get()
            publish("second")  # read after a pause, which the loop overruns:
            loop.call_soon(time.sleep, 3 * batch)  # a loop with more work than it can do
            await subscription.get()
            sent = loop.time()
            publish("third")
            await subscription.get()
            return loop.time() - sent

    assert asyncio.run(scenario()) < batch * 0.8, "a saturated reader does not pause"
