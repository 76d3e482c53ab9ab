"""The two clients whose receive times the benchmark compares.

- ``PatternSubscriber`` reads what a worker publishes: a handful of Redis connections, each
  pattern-subscribed to one shard of the turn channels (a turn's message id names its shard), so
  a thousand channels cost a few sockets and no per-turn subscribe.
- ``read_direct`` is the floor: it creates the runs itself and reads each run's SSE stream
  straight from the stub, with nothing in between. Whatever a worker adds is measured against it.

Both only stamp and keep what arrives; decoding and checking happen after the load (see
``bench.metrics``), so our own bookkeeping never delays a stamp.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from typing import Any
from urllib.parse import urlsplit

import redis

from bench.metrics import TurnTrace
from worker.sse import SseParser

_END_PREFIXES = (b'{"event":"message_end"', b'{"event":"error"')
SUBSCRIBER_NAME_PREFIX = "bench-sub"


class PatternSubscriber:
    """Records every message on the benchmark's turn channels with the time it arrived."""

    def __init__(self, redis_url: str, channel_prefix: str, tag: str, shards: int = 4) -> None:
        self.channel_prefix = channel_prefix
        self.tag = tag
        self.shards = shards
        self._redis_url = redis_url
        self._messages: dict[str, list[tuple[float, bytes]]] = defaultdict(list)
        self._ended: set[str] = set()
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._clients: list[redis.Redis] = []

    def message_id(self, index: int) -> str:
        """The message id of the benchmark's turn ``index``; its shard is in the name."""
        return f"{self.tag}-{index % self.shards:x}-{index}"

    def start(self) -> PatternSubscriber:
        ready = threading.Barrier(self.shards + 1)
        for shard in range(self.shards):
            client = redis.Redis.from_url(self._redis_url, socket_timeout=30,
                                          client_name=f"{SUBSCRIBER_NAME_PREFIX}-{shard}")
            self._clients.append(client)
            pattern = f"{self.channel_prefix}{self.tag}-{shard:x}-*"
            thread = threading.Thread(target=self._listen, args=(client, pattern, ready),
                                      name=f"bench-subscriber-{shard}", daemon=True)
            thread.start()
            self._threads.append(thread)
        ready.wait(timeout=10)
        return self

    def _listen(self, client: redis.Redis, pattern: str, ready: threading.Barrier) -> None:
        pubsub = client.pubsub()
        pubsub.psubscribe(pattern)
        pubsub.get_message(timeout=5)  # the subscription's confirmation
        ready.wait(timeout=10)
        prefix_length = len(self.channel_prefix)
        messages, ended, changed = self._messages, self._ended, self._changed
        while not self._stop.is_set():
            message = pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)
            if message is None:
                continue
            received_at = time.time()
            key = message["channel"][prefix_length:].decode()
            data: bytes = message["data"]
            messages[key].append((received_at, data))
            if data.startswith(_END_PREFIXES):
                with changed:
                    ended.add(key)
                    changed.notify_all()
        pubsub.close()

    def wait_for_ends(self, keys: Sequence[str], timeout: float) -> bool:
        """True once every turn in ``keys`` has ended; False when ``timeout`` passes first."""
        wanted = set(keys)
        deadline = time.monotonic() + timeout
        with self._changed:
            while not wanted <= self._ended:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._changed.wait(min(remaining, 1.0))
        return True

    def ended_count(self, keys: Sequence[str]) -> int:
        with self._changed:
            return len(self._ended.intersection(keys))

    def messages_of(self, key: str) -> list[tuple[float, bytes]]:
        return list(self._messages.get(key, ()))

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(5)
        for client in self._clients:
            client.close()


# The floor --------------------------------------------------------------------------------


class StreamRefused(Exception):
    """The stub answered a run's create or stream request with something else than a stream."""


async def open_run_stream(host: str, port: int, body: dict[str, object]
                          ) -> tuple[str, asyncio.StreamReader, asyncio.StreamWriter]:
    """Create a run on the stub and open its SSE stream on the same connection.

    Plain HTTP/1.1 on asyncio streams: the cheapest client there is. The caller closes the
    writer; on a refusal it is closed here.
    """
    reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
    try:
        payload = json.dumps(body).encode()
        writer.write(b"POST /runs HTTP/1.1\r\nHost: stub\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
        status, headers = await _response_head(reader)
        answer = await reader.readexactly(int(headers.get("content-length", "0")))
        if status != 202:
            raise StreamRefused(f"create answered {status}: {answer[:200]!r}")
        run_id = json.loads(answer)["run_id"]
        writer.write(f"GET /runs/{run_id}/events/sse?after=0-0 HTTP/1.1\r\nHost: stub\r\n"
                     "Accept: text/event-stream\r\n\r\n".encode())
        status, headers = await _response_head(reader)
        if status != 200 or headers.get("transfer-encoding") != "chunked":
            raise StreamRefused(f"stream answered {status} {headers}")
    except BaseException:
        writer.close()
        raise
    return run_id, reader, writer


# What a run's stream can fail with: refused, closed, reset, cut short or garbled. Readers record
# it as that turn's failure, so one broken stream never stops the other runs read beside it.
BROKEN_STREAM = (StreamRefused, OSError, asyncio.IncompleteReadError, ValueError)


def stagger_of(index: int, runs: int, stagger: float) -> float:
    """When run ``index`` of ``runs`` starts, so that the runs' token times fill one interval.

    The stub paces every run on its own clock from its start, so runs created together emit
    in step for their whole life: a reader that starts them all at once would get bursts of N
    tokens that a worker, whose turns start spread over their pick-up, never sees. Spreading
    the starts over one token interval gives the floor and the relay the same even mix.
    """
    return stagger * index / runs if runs else 0.0


def staggered(bodies: dict[str, dict[str, object]], stagger: float
              ) -> list[tuple[str, dict[str, object], float]]:
    """Each run's key, body and start delay (``stagger_of``)."""
    return [(key, body, stagger_of(index, len(bodies), stagger))
            for index, (key, body) in enumerate(bodies.items())]


async def read_direct(stub_url: str, bodies: dict[str, dict[str, object]],
                      traces: dict[str, TurnTrace], timeout: float, *,
                      stagger: float = 0.0) -> dict[str, str]:
    """Create one run per body and read its events straight off the stub; return the run ids.

    One coroutine per run, all at once (``open_run_stream``), so its figures are the floor a
    worker is compared with. Run i starts ``stagger`` x i / N after the first (``stagger_of``).
    """
    parts = urlsplit(stub_url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    run_ids: dict[str, str] = {}

    async def one(key: str, body: dict[str, object], delay: float) -> None:
        await asyncio.sleep(delay)
        trace = traces[key]
        trace.started_at = time.time()
        try:
            run_id, reader, writer = await open_run_stream(host, port, body)
        except StreamRefused as refused:
            trace.problems.append(str(refused))
            return
        run_ids[key] = run_id
        try:
            await follow_stream(reader, trace)
        finally:
            writer.close()

    async def all_runs() -> None:
        async with asyncio.timeout(timeout):
            await asyncio.gather(*(one(*run) for run in staggered(bodies, stagger)))

    with contextlib.suppress(TimeoutError):  # turns that did not end show up as failures
        await all_runs()
    return run_ids


async def _response_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    status_line = await reader.readline()
    status = int(status_line.split()[1])
    headers: dict[str, str] = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers


RUN_ENDS = frozenset({"run_succeeded", "run_failed", "run_cancelled"})


async def run_events(reader: asyncio.StreamReader
                     ) -> AsyncIterator[tuple[float, dict[str, Any]]]:
    """The envelopes of a chunked SSE body, each with the time its chunk came off the socket.

    Ends after the run's terminal event; raises ``StreamRefused`` if the body ends before it.
    """
    parser = SseParser()
    while True:
        size_line = await reader.readline()
        if not size_line:
            raise StreamRefused("the stub closed the connection before a terminal event")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            raise StreamRefused("the stream ended before a terminal event")
        chunk = await reader.readexactly(size + 2)
        received_at = time.time()
        for frame in parser.feed(chunk[:-2]):
            envelope = json.loads(frame.data)
            yield received_at, envelope
            if envelope.get("type") in RUN_ENDS:
                return


async def follow_stream(reader: asyncio.StreamReader, trace: TurnTrace) -> None:
    """Read a chunked SSE body until the run's terminal event."""
    try:
        async for received_at, envelope in run_events(reader):
            delta = envelope.get("agent_message_delta")
            if delta:
                trace.add_delta(received_at, delta)
            kind = envelope.get("type")
            if kind in RUN_ENDS:
                trace.end_at = received_at
                trace.end_kind = "message_end" if kind == "run_succeeded" else "error"
                trace.end_answer = trace.text
                if kind != "run_succeeded":
                    trace.problems.append(f"{kind}: {envelope.get('data')}")
    except BROKEN_STREAM as exc:
        trace.problems.append(f"{type(exc).__name__}: {exc}")
