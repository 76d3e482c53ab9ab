"""The SSE gateway as a client sees it: a real gateway process on a socket, real Redis, real SSE
clients (httpx), and the real worker and stub backend where a whole turn matters.

Ground truth is a plain pub/sub subscriber present from before a turn starts: every gateway
client, however late it comes or however often it reconnects, must end up with exactly its
messages, in order, once each. Tests that need a turn to be in a given state publish with the
worker's own ``EventBus`` instead, which is quicker and exact.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from gateway.tokens import mint_stream_token
from tests.conftest import (
    ROOT,
    WAIT_SECONDS,
    RunningGateway,
    RunningWorker,
    SSEFrame,
    SSEParser,
    StubControl,
    TurnListener,
    answer_of,
    make_turn,
)
from worker.client import submit_turn
from worker.publisher import EventBus, TurnIds, replay_log_key

ARTIFACTS = ROOT / "artifacts"
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


def new_ids() -> TurnIds:
    return TurnIds(task_id=f"task-{uuid.uuid4().hex[:8]}",
                   message_id=f"msg-{uuid.uuid4().hex[:12]}",
                   conversation_id=f"conv-{uuid.uuid4().hex[:12]}")


def publish_turn(bus: EventBus, ids: TurnIds, deltas: list[str]) -> None:
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
    assert_exactly_the_turn(replayed, truth)
    assert after_the_end.status == 204


@SQLITE_WORKER
def test_two_hundred_concurrent_clients_all_get_the_identical_stream(
    celery_worker: RunningWorker, stub: StubControl, listen: Any, producer_app: Any,
    gateway: RunningGateway,
) -> None:
    turn = make_turn(query="many readers")
    stub.plan(turn["message_id"], answer_tokens=60, token_delay=0.01)
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
                             user_id="user-1", ttl_seconds=600)


def _expired_token(gateway: RunningGateway, message_id: str) -> str:
    return mint_stream_token(gateway.settings.gateway_secret.get_secret_value().encode(),
                             message_id=message_id, user_id="user-1", ttl_seconds=60,
                             now=time.time() - 120)


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


def test_a_resume_point_that_is_not_a_seq_is_a_bad_request(
    gateway: RunningGateway, event_bus: EventBus,
) -> None:
    ids = new_ids()
    response = httpx.get(gateway.events_url(ids.message_id), timeout=5,
                         params={"token": gateway.token(ids.message_id), "after": "seven"})

    assert response.status_code == 400
    assert response.json()["code"] == "invalid_param"


def test_nothing_is_lost_when_the_gateways_pubsub_connection_drops_mid_turn(
    gateway: RunningGateway, event_bus: EventBus, redis_client: redis.Redis,
) -> None:
    ids = new_ids()
    publisher = event_bus.turn(ids)
    url = gateway.events_url(ids.message_id)
    token = gateway.token(ids.message_id)
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


def _resident_bytes(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines()
                    if line.startswith("VmRSS:"))) * 1024


def test_a_client_that_stops_reading_is_cut_off_and_can_resume(
    gateway: RunningGateway, event_bus: EventBus,
) -> None:
    ids = new_ids()
    publisher = event_bus.turn(ids)
    url = gateway.events_url(ids.message_id)
    token = gateway.token(ids.message_id)
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


def test_a_client_whose_socket_takes_nothing_for_the_send_timeout_is_cut_off(
    gateway: RunningGateway, event_bus: EventBus,
) -> None:
    """Few but large events: the client's queue never fills, its socket does."""
    ids = new_ids()
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


# The demo page in a browser -----------------------------------------------------------------


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.fail("Chromium is not installed: the demo page test needs it. Run scripts/install "
                "(it installs Chromium when missing) or apt-get install -y chromium.")


def _run_chromium(url: str, *actions: str, timeout: float = 40.0) -> str:
    with tempfile.TemporaryDirectory() as profile:
        completed = subprocess.run(
            [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
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
    assert f"done: {len(truth)} events, last seq {truth[-1]['seq']}" in dom
    assert screenshot.stat().st_size > 10_000


def test_the_demo_page_is_served(gateway: RunningGateway) -> None:
    response = httpx.get(f"{gateway.url}/demo", timeout=5)

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "new EventSource(" in response.text
