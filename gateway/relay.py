"""Relaying one turn's events to a client exactly once and in order, however late it comes.

The worker appends every message to the turn's replay log and publishes it on the turn's
channel in one atomic Lua call (worker/publisher.py). So a client that **subscribes first and
then reads the log** misses nothing: a message published before the subscription took effect is
in the log, one published after it arrives on the channel (and may be in the log read too). The
stream drops what it has already sent by ``seq``; a gap in the live messages (there should be
none) is filled from the log.

One process serves many clients with one pub/sub connection (``PubSubHub``): a channel is
subscribed while at least one client reads it, and each message is parsed and framed once and
handed to every client's bounded queue. A client whose queue is full has fallen too far behind:
it is cut off (``Subscription.overflowed``) rather than buffered without bound, and resumes with
``Last-Event-ID``. If the pub/sub connection drops, every stream waits for it to come back and
re-reads the log from its last sent seq, so nothing published meanwhile is lost either.
Log reads share one connection pool (``ReplayLog``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import RedisError

from gateway.sse import CloseReason, encode_frame
from worker.publisher import TERMINAL_EVENTS, replay_log_key, seq_key

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TurnEvent:
    """One message of a turn, parsed once and framed once, however many clients get it."""

    seq: int
    terminal: bool
    frame: bytes

    @classmethod
    def from_message(cls, data: bytes) -> TurnEvent:
        """Raises ``ValueError`` for anything that is not one of the worker's messages."""
        text = data.decode()
        message = json.loads(text)
        if not isinstance(message, dict) or type(message.get("seq")) is not int:
            raise ValueError("not a turn event: no integer seq")
        return cls(seq=message["seq"], terminal=message.get("event") in TERMINAL_EVENTS,
                   frame=encode_frame(text, event_id=message["seq"]))


class _Resync:
    """Queued for every client when the pub/sub connection was lost: re-read the log."""


RESYNC = _Resync()


@dataclass(eq=False)
class _Channel:
    subscribers: set[Subscription] = field(default_factory=set)
    ready: asyncio.Event = field(default_factory=asyncio.Event)


class Subscription:
    """One client's share of a channel: a bounded queue of live events."""

    def __init__(self, channel: str, state: _Channel, buffer_events: int) -> None:
        self.channel = channel
        self._state = state
        self._queue: asyncio.Queue[TurnEvent | _Resync] = asyncio.Queue(buffer_events)
        self.overflowed = asyncio.Event()

    def deliver(self, item: TurnEvent | _Resync) -> None:
        if self.overflowed.is_set():
            return
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            self.overflowed.set()
            while not self._queue.empty():
                self._queue.get_nowait()

    async def get(self) -> TurnEvent | _Resync:
        return await self._queue.get()

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    async def wait_ready(self, timeout: float) -> bool:
        """Whether the channel is subscribed on Redis (acknowledged) within ``timeout``."""
        try:
            async with asyncio.timeout(timeout):
                await self._state.ready.wait()
        except TimeoutError:
            return False
        return True


class PubSubHub:
    """The process's one pub/sub connection, shared by every stream.

    A channel is ready once Redis has acknowledged the latest SUBSCRIBE sent for it: only then
    may a stream read the log, or a message published in between could be missed by both.
    (Acknowledgements come back in the order the commands went out; counting the ones still
    due per channel tells which is the latest, across quick unsubscribe/subscribe cycles.)
    """

    def __init__(self, url: str, *, health_check_seconds: float) -> None:
        # Named, so that an operator (or a test) can tell this connection apart in CLIENT LIST.
        self._pool = aioredis.ConnectionPool.from_url(
            url, socket_keepalive=True, socket_connect_timeout=5,
            client_name=f"agent-turn-gateway-pubsub-{os.getpid()}")
        self._health_check = health_check_seconds
        self._channels: dict[str, _Channel] = {}
        self._unacknowledged: Counter[str] = Counter()
        self._connection: AbstractConnection | None = None
        self._task: asyncio.Task[None] | None = None
        self.messages_relayed = 0

    @property
    def connected(self) -> bool:
        return self._connection is not None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="pubsub-hub")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._pool.disconnect()

    async def subscribe(self, channel: str, *, buffer_events: int) -> Subscription:
        state = self._channels.get(channel)
        if state is None:
            state = self._channels[channel] = _Channel()
            await self._send("SUBSCRIBE", channel)
        subscription = Subscription(channel, state, buffer_events)
        state.subscribers.add(subscription)
        return subscription

    async def unsubscribe(self, subscription: Subscription) -> None:
        state = self._channels.get(subscription.channel)
        if state is None or subscription not in state.subscribers:
            return
        state.subscribers.discard(subscription)
        if not state.subscribers:
            del self._channels[subscription.channel]
            await self._send("UNSUBSCRIBE", subscription.channel)

    def stats(self) -> dict[str, Any]:
        subscriptions = [sub for state in self._channels.values() for sub in state.subscribers]
        return {
            "redis_connected": self.connected,
            "channels": len(self._channels),
            "subscriptions": len(subscriptions),
            "queued_events": sum(sub.queued for sub in subscriptions),
            "messages_relayed": self.messages_relayed,
        }

    async def _send(self, command: str, *channels: str) -> None:
        """Send on the live connection, if any; a lost one re-subscribes everything anyway."""
        connection = self._connection
        if connection is None:
            return
        if command == "SUBSCRIBE":
            # Counted before sending: the acknowledgement may be read as soon as this yields.
            self._unacknowledged.update(channels)
        try:
            await connection.send_command(command, *channels, check_health=False)
        except (RedisError, OSError) as exc:
            log.warning("pub/sub %s failed, left to the reconnection: %s", command, exc)

    async def _run(self) -> None:
        delay = 0.1
        while True:
            connection = self._pool.make_connection()
            try:
                await connection.connect()
                # Made current before the channels are re-subscribed, so that a stream which
                # subscribes meanwhile sends its own SUBSCRIBE on this connection.
                self._connection = connection
                if self._channels:
                    await self._send("SUBSCRIBE", *self._channels)
                log.info("pub/sub connection up, %d channels", len(self._channels))
                delay = 0.1
                await self._read(connection)
            except (RedisError, OSError) as exc:
                log.warning("pub/sub connection lost: %s; reconnecting in %.1fs", exc, delay)
            finally:
                self._connection = None
                self._connection_lost()
                await connection.disconnect(nowait=True)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _read(self, connection: AbstractConnection) -> None:
        pinger = asyncio.create_task(self._ping(connection))
        try:
            while True:
                reply = await connection.read_response(timeout=3 * self._health_check)
                if reply is None:
                    raise ConnectionError("no reply from Redis, not even to PING")
                if isinstance(reply, list) and len(reply) == 3:
                    kind, channel, payload = reply
                    if kind == b"message":
                        self._fan_out(channel.decode(), payload)
                    elif kind == b"subscribe":
                        self._acknowledged(channel.decode())
        finally:
            pinger.cancel()
            await asyncio.gather(pinger, return_exceptions=True)

    async def _ping(self, connection: AbstractConnection) -> None:
        """Something to read every interval, so a silently dead connection is noticed."""
        while True:
            await asyncio.sleep(self._health_check)
            try:
                await connection.send_command("PING", check_health=False)
            except (RedisError, OSError):
                return

    def _acknowledged(self, channel: str) -> None:
        self._unacknowledged[channel] -= 1
        if self._unacknowledged[channel] <= 0:
            del self._unacknowledged[channel]
            state = self._channels.get(channel)
            if state is not None:
                state.ready.set()

    def _fan_out(self, channel: str, payload: bytes) -> None:
        state = self._channels.get(channel)
        if state is None or not state.subscribers:
            return
        try:
            event = TurnEvent.from_message(payload)
        except ValueError as exc:
            log.warning("ignoring a message on %s that is not a turn event: %s", channel, exc)
            return
        self.messages_relayed += 1
        for subscription in list(state.subscribers):
            subscription.deliver(event)

    def _connection_lost(self) -> None:
        self._unacknowledged.clear()
        for state in self._channels.values():
            state.ready.clear()
            for subscription in list(state.subscribers):
                subscription.deliver(RESYNC)


class ReplayLog:
    """Reads of turns' replay logs, over a shared pool."""

    def __init__(self, client: aioredis.Redis, *, page_size: int) -> None:
        self._redis = client
        self.page_size = page_size

    async def read_after(self, message_id: str, after: int) -> list[TurnEvent]:
        """Up to one page of the turn's events with seq above ``after``, in order."""
        entries = await self._redis.xrange(replay_log_key(message_id), min=f"{after + 1}-0",
                                           max="+", count=self.page_size)
        return [TurnEvent.from_message(fields[b"data"]) for _, fields in entries]

    async def event(self, message_id: str, seq: int) -> TurnEvent | None:
        entries = await self._redis.xrange(replay_log_key(message_id), min=f"{seq}-0",
                                           max=f"{seq}-0")
        return TurnEvent.from_message(entries[0][1][b"data"]) if entries else None

    async def expired(self, message_id: str) -> bool:
        """Whether the turn published events whose log is gone (it ended long enough ago)."""
        pipeline = self._redis.pipeline(transaction=False)
        pipeline.exists(replay_log_key(message_id))
        pipeline.get(seq_key(message_id))
        log_exists, published = await pipeline.execute()
        return not log_exists and int(published or 0) > 0


@dataclass
class StreamCounters:
    """What /healthz reports about the streams this process has served."""

    open: int = 0
    closed: Counter[str] = field(default_factory=Counter)


class TurnStream:
    """One client's stream of one turn: replay from the log, then live, each seq once.

    The stream is opened (subscribed, and the first page read) before the response starts, so
    that a turn that cannot be streamed is answered with an HTTP error instead.
    """

    def __init__(self, *, message_id: str, user_id: str, after: int, first_page: list[TurnEvent],
                 hub: PubSubHub, subscription: Subscription, replay_log: ReplayLog,
                 resubscribe_timeout: float, counters: StreamCounters) -> None:
        self.message_id = message_id
        self.user_id = user_id
        self.last_seq = after
        self.sent = 0
        self._backlog: deque[TurnEvent] = deque(first_page)
        self._log_may_hold_more = len(first_page) >= replay_log.page_size
        self._gap_event: TurnEvent | None = None
        self._ended = False
        self._hub = hub
        self._subscription = subscription
        self._log = replay_log
        self._resubscribe_timeout = resubscribe_timeout
        self._counters = counters
        counters.open += 1

    @property
    def overflowed(self) -> asyncio.Event:
        return self._subscription.overflowed

    async def next_frame(self) -> bytes | None:
        if self._ended:
            return None
        try:
            event = await self._next_event()
        except (RedisError, OSError) as exc:
            log.warning("stream of %s stopped, Redis failed: %s", self.message_id, exc)
            return None
        if event is None:
            return None
        self.last_seq = event.seq
        self.sent += 1
        self._ended = event.terminal
        return event.frame

    async def _next_event(self) -> TurnEvent | None:
        while True:
            while self._backlog:
                event = self._backlog.popleft()
                if event.seq > self.last_seq:
                    return event
            if self._log_may_hold_more:
                page = await self._log.read_after(self.message_id, self.last_seq)
                self._log_may_hold_more = len(page) >= self._log.page_size
                self._backlog.extend(page)
                continue
            if self._gap_event is not None:
                # The log did not hold the missing seqs: nothing better can be sent than this.
                event, self._gap_event = self._gap_event, None
                if event.seq > self.last_seq:
                    log.warning("turn %s: seqs %d-%d are in neither the log nor the channel",
                                self.message_id, self.last_seq + 1, event.seq - 1)
                    return event
                continue
            item = await self._subscription.get()
            if isinstance(item, _Resync):
                if not await self._subscription.wait_ready(self._resubscribe_timeout):
                    log.warning("stream of %s stopped: pub/sub not back within %.0fs",
                                self.message_id, self._resubscribe_timeout)
                    return None
                self._log_may_hold_more = True
            elif item.seq == self.last_seq + 1:
                return item
            elif item.seq > self.last_seq:
                self._gap_event = item
                self._log_may_hold_more = True

    async def aclose(self, reason: CloseReason) -> None:
        await self._hub.unsubscribe(self._subscription)
        self._counters.open -= 1
        self._counters.closed[reason.value] += 1
        level = logging.WARNING if reason in (CloseReason.TOO_SLOW,
                                              CloseReason.SEND_TIMEOUT) else logging.INFO
        log.log(level, "stream of turn %s for user %s closed (%s): %d events sent, last seq %d",
                self.message_id, self.user_id, reason.value, self.sent, self.last_seq)
