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

Only the turn's owner reads it. A turn's payload may name any message id, so the message id in
a client's token does not make the message theirs: the worker records each message's owner and
publishes a turn refused for ownership on the refused sender's own stream (worker/ownership.py).
Each client's ``Route`` picks, by that record and the owner signed into its token, which stream
it reads; every key it reads (channel, log, counter) is derived from that stream's id, and while
the record is not there yet it relays nothing of the message's own stream.

A stream that has published nothing closes after ``first_event_timeout`` with a final
``turn_not_started`` frame (``TurnStream``), so a turn that never starts does not hold a client
for ever.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import RedisError, ResponseError

try:
    import hiredis
except ImportError:  # redis-py parses the pub/sub replies itself
    hiredis = None

from gateway.sse import IDLE, CloseReason, DirectWriter, _Idle, encode_frame
from worker.ownership import owner_key, refusal_stream
from worker.publisher import TERMINAL_EVENTS, replay_log_key, seq_key, seq_of

log = logging.getLogger(__name__)

# What one read of the pub/sub socket takes at most.
_READ_SIZE = 1 << 16
# How long the pub/sub reader reads without pausing once its loop was found saturated.
_BUSY_SECONDS = 0.25


@dataclass(frozen=True, slots=True)
class TurnEvent:
    """One message of a turn, parsed once and framed once, however many clients get it."""

    seq: int
    terminal: bool
    frame: bytes

    @classmethod
    def from_message(cls, data: bytes) -> TurnEvent:
        """Raises ``ValueError`` for anything that is not one of the worker's messages.

        The publish script writes each message as ``{"event":"<kind>",…,"seq":<n>}`` with no
        raw line break in it (JSON escapes them): such a message is read and framed without
        decoding its JSON, which was most of the cost of a message here. Anything else takes
        the full path.
        """
        cut = data.rfind(b',"seq":')
        if cut > 0 and data.startswith(b'{"event":"') and data.endswith(b"}") \
                and data[cut + 7:-1].isdigit() and b"\n" not in data and b"\r" not in data:
            seq = int(data[cut + 7:-1])
            terminal = data.startswith((b'{"event":"message_end"', b'{"event":"error"'))
            return cls(seq=seq, terminal=terminal,
                       frame=b"id: %d\ndata: %s\n\n" % (seq, data))
        text = data.decode()
        message = json.loads(text)
        if not isinstance(message, dict) or type(message.get("seq")) is not int:
            raise ValueError("not a turn event: no integer seq")
        return cls(seq=message["seq"], terminal=message.get("event") in TERMINAL_EVENTS,
                   frame=encode_frame(text, event_id=message["seq"]))


class _Resync:
    """Queued for every client when the pub/sub connection was lost: re-read the log."""


RESYNC = _Resync()


class _NotStarted:
    """What the wait for a stream's first event gives when it has waited too long."""


NOT_STARTED = _NotStarted()

# What a client's queue holds: a channel's event, or a word for the stream itself.
_Item = tuple[str, "TurnEvent"] | _Resync | _Idle | _NotStarted


@dataclass(eq=False)
class _Channel:
    subscribers: set[Subscription] = field(default_factory=set)
    ready: asyncio.Event = field(default_factory=asyncio.Event)


class Subscription:
    """One client's share of one or more channels: one bounded queue of their live events.

    One queue, not one per channel, so that a stream whose route is not decided yet (it reads
    a message's channel and a refusal channel, see ``Route``) takes its events in the order
    they came, and so that its memory bound and ``overflowed`` stay one.
    """

    def __init__(self, buffer_events: int) -> None:
        self._states: dict[str, _Channel] = {}
        # A deque and one waiter, not an asyncio.Queue: this is on the path of every frame to
        # every client, and the queue's own bookkeeping was a tenth of the gateway's CPU.
        self._items: deque[_Item] = deque()
        self._limit = buffer_events
        self._waiter: asyncio.Future[None] | None = None
        self.overflowed = False
        self.on_overflow: Callable[[], None] | None = None
        # The live copies of events the stream holds already (read from its log) are dropped
        # here, not queued: while pub/sub lags behind the log, a resumed stream would otherwise
        # count a page of duplicates against its bound and be cut as slow (``held_through``).
        self._held_channel: str | None = None
        self._held_through = 0
        # Set while the stream waits with nothing queued and can write a live event itself
        # (``TurnStream._express``): the event is then written, not queued.
        self.express: Callable[[str, TurnEvent], bool] | None = None

    @property
    def channels(self) -> frozenset[str]:
        return frozenset(self._states)

    def held_through(self, channel: str, seq: int) -> None:
        """The stream holds every event of ``channel`` up to ``seq``: drop their live copies."""
        if channel != self._held_channel:
            self._held_channel, self._held_through = channel, seq
        elif seq > self._held_through:
            self._held_through = seq

    def deliver(self, channel: str, event: TurnEvent) -> None:
        if event.seq <= self._held_through and channel == self._held_channel:
            return
        express = self.express
        if express is not None and not self._items and express(channel, event):
            return
        self._put((channel, event))

    def resync(self) -> None:
        self._put(RESYNC)

    def wake(self, item: _Idle | _NotStarted) -> None:
        """Wake the stream's wait with ``item``, if it is not behind (then it is not idle)."""
        if not self._items:
            self._push(item)

    def _put(self, item: _Item) -> None:
        if self.overflowed:
            return
        if len(self._items) >= self._limit:
            self.overflowed = True
            self._items.clear()
            if self.on_overflow is not None:
                self.on_overflow()
            return
        self._push(item)

    def _push(self, item: _Item) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _attach(self, channel: str, state: _Channel) -> None:
        self._states[channel] = state

    def _detach(self, channel: str) -> _Channel | None:
        """Stop reading ``channel``; what it queued already is dropped (nobody will read it)."""
        state = self._states.pop(channel, None)
        if state is not None:
            self._items = deque(item for item in self._items
                                if not isinstance(item, tuple) or item[0] != channel)
        return state

    async def get(self) -> _Item:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.popleft()

    def get_nowait(self) -> _Item | None:
        return self._items.popleft() if self._items else None

    @property
    def queued(self) -> int:
        return len(self._items)

    async def wait_ready(self, timeout: float) -> bool:
        """Whether all its channels are subscribed on Redis (acknowledged) within ``timeout``."""
        try:
            async with asyncio.timeout(timeout):
                for state in list(self._states.values()):
                    await state.ready.wait()
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

    def __init__(self, url: str, *, health_check_seconds: float,
                 read_batch_seconds: float = 0.0) -> None:
        # Named, so that an operator (or a test) can tell this connection apart in CLIENT LIST.
        self._pool = aioredis.ConnectionPool.from_url(
            url, socket_keepalive=True, socket_connect_timeout=5,
            client_name=f"agent-turn-gateway-pubsub-{os.getpid()}")
        self._health_check = health_check_seconds
        self._read_batch = read_batch_seconds
        self._channels: dict[str, _Channel] = {}
        self._unacknowledged: Counter[str] = Counter()
        self._connection: AbstractConnection | None = None
        self._task: asyncio.Task[None] | None = None
        self._replied_at = 0.0
        self.messages_relayed = 0
        self.reads = 0  # of the pub/sub socket: messages_relayed / reads is the batching

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

    async def subscribe(self, channels: Iterable[str], *, buffer_events: int) -> Subscription:
        subscription = Subscription(buffer_events)
        new: list[str] = []
        for channel in channels:
            state = self._channels.get(channel)
            if state is None:
                state = self._channels[channel] = _Channel()
                new.append(channel)
            state.subscribers.add(subscription)
            subscription._attach(channel, state)
        if new:
            await self._send("SUBSCRIBE", *new)
        return subscription

    async def unsubscribe(self, subscription: Subscription,
                          channels: Iterable[str] | None = None) -> None:
        """Let go of some of its channels (all by default); Redis unsubscribes the unread."""
        gone: list[str] = []
        for channel in list(subscription.channels if channels is None else channels):
            state = subscription._detach(channel)
            if state is None:
                continue
            state.subscribers.discard(subscription)
            if not state.subscribers and self._channels.get(channel) is state:
                del self._channels[channel]
                gone.append(channel)
        if gone:
            await self._send("UNSUBSCRIBE", *gone)

    def _subscriptions(self) -> set[Subscription]:
        return {sub for state in self._channels.values() for sub in state.subscribers}

    def stats(self) -> dict[str, Any]:
        subscriptions = self._subscriptions()
        return {
            "redis_connected": self.connected,
            "channels": len(self._channels),
            "subscriptions": len(subscriptions),
            "queued_events": sum(sub.queued for sub in subscriptions),
            "messages_relayed": self.messages_relayed,
            "pubsub_reads": self.reads,
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
        loop = asyncio.get_running_loop()
        self._replied_at = loop.time()
        pinger = asyncio.create_task(self._ping(connection))
        # With hiredis, every reply already read is parsed in one loop without a coroutine
        # per message: redis-py's read_response (three awaits, a time-out check) per message
        # was a fifth of the gateway's Python time. Without it, redis-py reads each reply.
        stream = getattr(connection, "_reader", None)
        direct = hiredis is not None and isinstance(stream, asyncio.StreamReader)
        parser = hiredis.Reader() if direct else None
        transport = getattr(connection, "_writer", None)
        transport = getattr(transport, "transport", None)
        batch = self._read_batch if direct and transport is not None else 0.0
        drained = True
        busy_until = 0.0
        try:
            while True:
                if not direct:
                    # No time-out per read (one timer per message); the pinger watches silence.
                    reply = await connection.read_response(timeout=None)
                    self._replied_at = loop.time()
                    if reply is None:
                        raise ConnectionError("no reply from Redis")
                    self._handle(reply)
                    continue
                reply = parser.gets()  # type: ignore[union-attr]
                if reply is False:
                    # Only after a read that emptied the buffer: one that filled it leaves
                    # more to read now, and pausing then would cap how fast a backlog drains.
                    now = loop.time()
                    wait = self._replied_at + batch - now if drained else 0.0
                    if wait > 0 and now >= busy_until:
                        await self._gather(transport, wait)
                        if loop.time() - now > wait + batch:
                            # The loop had more to do than the pause: it is saturated, so it
                            # would not sleep anyway, and pausing would only leave the backlog
                            # in Redis. Read as it comes for a while.
                            busy_until = loop.time() + _BUSY_SECONDS
                    data = await stream.read(_READ_SIZE)
                    drained = len(data) < _READ_SIZE
                    self.reads += 1
                    if not data:
                        raise ConnectionError("Redis closed the pub/sub connection")
                    self._replied_at = loop.time()
                    parser.feed(data)  # type: ignore[union-attr]
                    continue
                if isinstance(reply, Exception):
                    raise ResponseError(f"pub/sub connection: {reply}")
                self._handle(reply)
        finally:
            pinger.cancel()
            await asyncio.gather(pinger, return_exceptions=True)

    @staticmethod
    async def _gather(transport: asyncio.Transport, seconds: float) -> None:
        """Leave the socket unread for ``seconds``, so that what comes meanwhile is read in one
        go. The transport stops reading, not only this coroutine: a transport that reads goes
        on waking the process for every packet, into the stream's buffer."""
        transport.pause_reading()
        try:
            await asyncio.sleep(seconds)
        finally:
            if not transport.is_closing():
                transport.resume_reading()

    def _handle(self, reply: Any) -> None:
        if isinstance(reply, list) and len(reply) == 3:
            kind, channel, payload = reply
            if kind == b"message":
                self._fan_out(channel.decode(), payload)
            elif kind == b"subscribe":
                self._acknowledged(channel.decode())

    async def _ping(self, connection: AbstractConnection) -> None:
        """Something to read every interval; a connection silent for three of them is dead
        (closing it ends the read loop, which reconnects)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self._health_check)
            if loop.time() - self._replied_at > 3 * self._health_check:
                log.warning("pub/sub connection silent for %.0fs, not even a PONG; closing it",
                            loop.time() - self._replied_at)
                await connection.disconnect(nowait=True)
                return
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
            subscription.deliver(channel, event)

    def _connection_lost(self) -> None:
        self._unacknowledged.clear()
        for state in self._channels.values():
            state.ready.clear()
        for subscription in self._subscriptions():
            subscription.resync()


class ReplayLog:
    """Reads of streams' replay logs and counters, and of messages' owner records, over a
    shared pool. Every key is derived from a *stream id*: a message id, or a refusal stream's
    id (``worker.ownership.refusal_stream``), never from the message id alone."""

    def __init__(self, client: aioredis.Redis, *, page_size: int, max_reads: int = 32,
                 reread_spread: float = 1.0) -> None:
        self._redis = client
        self.page_size = page_size
        # Reads wait their turn here rather than for a pooled connection, whose wait has a
        # time-out: after a lost pub/sub connection every stream re-reads at once.
        self._reads = asyncio.Semaphore(max_reads)
        self._reread_spread = reread_spread
        self.waiting_reads = 0

    async def spread_reread(self) -> None:
        """A random pause of up to the spread before a stream's re-read after a resync: the
        process's streams then re-read over that moment instead of in one burst."""
        if self._reread_spread > 0:
            await asyncio.sleep(random.uniform(0, self._reread_spread))

    async def read_after(self, stream_id: str, after: int) -> list[TurnEvent]:
        """Up to one page of the stream's events with seq above ``after``, in order."""
        self.waiting_reads += 1
        try:
            await self._reads.acquire()
        finally:
            self.waiting_reads -= 1
        try:
            entries = await self._redis.xrange(replay_log_key(stream_id), min=f"{after + 1}-0",
                                               max="+", count=self.page_size)
        finally:
            self._reads.release()
        return [TurnEvent.from_message(fields[b"data"]) for _, fields in entries]

    async def state(self, stream_id: str, after: int) -> StreamState:
        """Where the stream stands for a client resuming after ``after``, in one round trip."""
        key = replay_log_key(stream_id)
        pipeline = self._redis.pipeline(transaction=False)
        pipeline.get(seq_key(stream_id))
        pipeline.xrevrange(key, max="+", min="-", count=1)
        pipeline.xrange(key, min=f"{after}-0", max=f"{after}-0")
        pipeline.xrange(key, min=f"{after + 1}-0", max="+", count=self.page_size)
        published, last, at, page = await pipeline.execute()
        return StreamState(
            published=seq_of(published),
            last=TurnEvent.from_message(last[0][1][b"data"]) if last else None,
            at_resume_point=(TurnEvent.from_message(at[0][1][b"data"])
                             if at and after > 0 else None),
            first_page=[TurnEvent.from_message(fields[b"data"]) for _, fields in page])

    async def published(self, stream_id: str) -> int:
        """The last seq the stream gave out (its counter outlives its log); 0 for none yet."""
        return seq_of(await self._redis.get(seq_key(stream_id)))

    async def owner_of(self, message_id: str) -> str | None:
        """The fingerprint of the owner the worker recorded for the message, if any yet."""
        recorded = await self._redis.get(owner_key(message_id))
        return recorded.decode() if recorded is not None else None


@dataclass(frozen=True, slots=True)
class StreamState:
    """What a stream has published, as a client opening it after ``after`` needs to know."""

    # Its seq counter: the last seq it gave out (0: nothing yet).
    published: int
    # Its log's last entry, and the entry at the resume point; None when there is none (no log:
    # never published, or expired).
    last: TurnEvent | None
    at_resume_point: TurnEvent | None
    # The first page of events after the resume point.
    first_page: list[TurnEvent]

    @property
    def last_seq(self) -> int:
        return max(self.published, self.last.seq if self.last is not None else 0)

    @property
    def expired(self) -> bool:
        """It published, and its log is gone: it ended long enough ago."""
        return self.published > 0 and self.last is None

    def ended_by(self, after: int) -> bool:
        """Whether a client that has every event up to ``after`` has the stream's end.

        At the end (the resume point is a terminal event: a re-delivered turn may have
        published its end once more after it, which that client needs no more than the first)
        or past it (the last event is terminal and ``after`` is not before it).
        """
        if self.at_resume_point is not None and self.at_resume_point.terminal:
            return True
        return self.last is not None and self.last.terminal and after >= self.last.seq


class StreamRefused(Exception):
    """Why a stream is not opened; the app answers with ``status`` and nothing is streamed.

    204 has no body (an EventSource stops reconnecting on it); the others are JSON errors.
    """

    def __init__(self, status: int, code: str = "", message: str = "") -> None:
        super().__init__(message or code or str(status))
        self.status = status
        self.code = code
        self.message = message


class Route:
    """Which stream of a message one client reads, decided once by the message's owner record.

    The worker records the owner of a message (``owner_key``) before it publishes anything on
    the message's channel, and publishes a refusal (a turn whose message id is another owner's,
    or whose conversation is) on the refused sender's own stream (``refusal_stream``). So:

    - the record is the token's owner: the message's stream;
    - the record is another owner: the token owner's refusal stream, where their own refused
      turn's ``error`` goes; nothing of the message's own stream is ever read for them;
    - no record yet: undecided (``stream_id`` is None). The stream then reads both channels and
      decides on the first event: one on the refusal channel routes it there; one on the
      message's channel means the record exists now (it was written first), so it is read
      again, once, and routes to the message only if it names the token's owner. Anything
      else, a missing record included, is not the token owner's turn.

    Once decided the route never changes, so a record that changes later changes nothing.
    """

    def __init__(self, *, message_id: str, owner: str) -> None:
        self.message_id = message_id
        self.owner = owner
        self.refusal = refusal_stream(message_id, owner)
        self.stream_id: str | None = None

    @property
    def candidates(self) -> tuple[str, ...]:
        return (self.stream_id,) if self.stream_id is not None else (self.message_id,
                                                                     self.refusal)

    @property
    def kind(self) -> str:
        """For log lines: ``own``, ``refused`` or ``undecided``."""
        if self.stream_id is None:
            return "undecided"
        return "own" if self.stream_id == self.message_id else "refused"

    def decide(self, recorded_owner: str | None) -> str:
        """Route by the owner record as read now; no record (or another owner) is refusal."""
        self.stream_id = self.message_id if recorded_owner == self.owner else self.refusal
        return self.stream_id

    async def settle(self, log: ReplayLog) -> str | None:
        """Decide if the owner record or the refusal stream says enough now; else None.

        Called once the client's channels are subscribed (at open, and after the pub/sub
        connection came back), so that what is published after it arrives as an event.
        """
        if self.stream_id is None:
            recorded = await log.owner_of(self.message_id)
            if recorded is not None:
                self.decide(recorded)
            elif await log.published(self.refusal) > 0:
                self.stream_id = self.refusal
        return self.stream_id


@dataclass
class StreamCounters:
    """What /healthz reports about the streams this process has served: how many are open,
    and how each closed. A stream ends with its turn (``turn_ended``, ``turn_not_started``),
    by its client's choice (``client_disconnected``, ``cancelled`` at shutdown), or is *cut*
    (``CUT_CAUSES``): the client could not keep up, or Redis failed it."""

    open: int = 0
    closed: Counter[str] = field(default_factory=Counter)
    # Frames sent, and the writes they took: several frames ready at once go out in one write.
    frames: int = 0
    writes: int = 0
    # Of the writes, those the pub/sub reader made itself (``gateway.sse.DirectWriter``).
    direct_writes: int = 0

    def cut(self) -> dict[str, int]:
        return {cause: self.closed[cause] for cause in CUT_CAUSES if self.closed[cause]}


# Why a stream can be cut (see StreamCounters); the rest of the outcomes are endings.
CUT_CAUSES = ("client_too_slow", "send_timeout", "redis_failed", "pubsub_not_back")


class TurnStreams:
    """Opens clients' streams: the route, the subscription, the resume point, the first page.

    Everything that can refuse a stream is done here, before the response starts, so that a
    refusal is an HTTP status (``StreamRefused``) and never a stream that stops early.
    """

    def __init__(self, *, hub: PubSubHub, replay_log: ReplayLog,
                 channel_for: Callable[[str], str], buffer_events: int,
                 subscribe_timeout: float, first_event_timeout: float,
                 counters: StreamCounters, pubsub_outage: float | None = None) -> None:
        self._hub = hub
        self._log = replay_log
        self._channel_for = channel_for
        self._buffer_events = buffer_events
        self._subscribe_timeout = subscribe_timeout
        # How long open streams wait (pinging their clients) for a lost pub/sub connection.
        self._pubsub_outage = pubsub_outage if pubsub_outage is not None else subscribe_timeout
        self._first_event_timeout = first_event_timeout
        self.counters = counters

    async def open(self, *, message_id: str, user_id: str, owner: str,
                   after: int) -> TurnStream:
        """The client's stream, or ``StreamRefused``; Redis errors propagate (503 for the app).

        The owner record is read before subscribing only to subscribe to less: the route is
        settled again once the subscription is acknowledged, as the lossless order demands.
        """
        route = Route(message_id=message_id, owner=owner)
        recorded = await self._log.owner_of(message_id)
        if recorded is not None:
            route.decide(recorded)
        subscription = await self._hub.subscribe(
            [self._channel_for(stream_id) for stream_id in route.candidates],
            buffer_events=self._buffer_events)
        opened = False
        try:
            if not await subscription.wait_ready(self._subscribe_timeout):
                raise StreamRefused(503, "event_bus_unavailable",
                                    "the gateway cannot subscribe to the turn's events")
            stream_id = await route.settle(self._log)
            first_page: list[TurnEvent] = []
            waits_for_first_event = True
            if stream_id is None:
                if after > 0:
                    # Nothing the client may read has been published: it cannot have seen any.
                    raise StreamRefused(400, "invalid_param",
                                        "resume point past the turn's last event")
            else:
                await keep_only(self._hub, subscription, self._channel_for(stream_id))
                state = await self._log.state(stream_id, after)
                if state.expired:
                    raise StreamRefused(410, "turn_expired",
                                        "the turn ended long ago and its events are gone")
                if state.ended_by(after):
                    raise StreamRefused(204)
                if after > state.last_seq:
                    raise StreamRefused(400, "invalid_param",
                                        "resume point past the turn's last event")
                first_page = state.first_page
                if first_page:
                    subscription.held_through(self._channel_for(stream_id), first_page[-1].seq)
                waits_for_first_event = state.last_seq == 0
            loop = asyncio.get_running_loop()
            stream = TurnStream(
                route=route, user_id=user_id, after=after, first_page=first_page,
                first_event_by=(loop.time() + self._first_event_timeout
                                if waits_for_first_event else None),
                first_event_timeout=self._first_event_timeout, hub=self._hub,
                subscription=subscription, replay_log=self._log,
                channel_for=self._channel_for, resubscribe_timeout=self._pubsub_outage,
                counters=self.counters)
            opened = True
            return stream
        finally:
            if not opened:
                await self._hub.unsubscribe(subscription)


async def keep_only(hub: PubSubHub, subscription: Subscription, channel: str) -> None:
    """Let go of every channel of the subscription but ``channel`` (a decided route's)."""
    others = [other for other in subscription.channels if other != channel]
    if others:
        await hub.unsubscribe(subscription, others)


class TurnStream:
    """One client's stream of one turn: replay from the log, then live, each seq once.

    It reads its route's stream only; while the route is undecided it relays nothing but
    decides it (``Route``) on the first event of either channel, then reads that stream's log
    from the start, which holds the deciding event too (the log and the channel are written
    by one atomic call). A stream that has published nothing when the client opened it ends,
    if it still has sent nothing ``first_event_timeout`` seconds later, with one
    ``turn_not_started`` error frame without an id: it is not one of the turn's events, so it
    must not move the client's ``Last-Event-ID``.
    """

    def __init__(self, *, route: Route, user_id: str, after: int, first_page: list[TurnEvent],
                 first_event_by: float | None, first_event_timeout: float, hub: PubSubHub,
                 subscription: Subscription, replay_log: ReplayLog,
                 channel_for: Callable[[str], str], resubscribe_timeout: float,
                 counters: StreamCounters) -> None:
        self.message_id = route.message_id
        self.user_id = user_id
        self.route = route
        self.last_seq = after
        self.sent = 0
        self.not_started = False
        self._backlog: deque[TurnEvent] = deque(first_page)
        self._log_may_hold_more = len(first_page) >= replay_log.page_size
        self._gap_event: TurnEvent | None = None
        self._ended = False
        self._first_event_timeout = first_event_timeout
        # One timer for the first event, not a time-out on every wait.
        self._first_event_timer = (
            asyncio.get_running_loop().call_at(first_event_by, subscription.wake, NOT_STARTED)
            if first_event_by is not None else None)
        self._hub = hub
        self._subscription = subscription
        self._log = replay_log
        self._channel_for = channel_for
        self._resubscribe_timeout = resubscribe_timeout
        self._counters = counters
        self._held: tuple[str, TurnEvent] | _Resync | None = None
        self._writer: DirectWriter | None = None
        self._live_channel: str | None = None
        self.stop_cause: str | None = None
        counters.open += 1

    def on_too_slow(self, callback: Callable[[], None]) -> None:
        self._subscription.on_overflow = callback
        if self._subscription.overflowed:
            callback()

    def poke(self) -> None:
        self._subscription.wake(IDLE)

    def attach_writer(self, writer: DirectWriter | None) -> None:
        self._writer = writer

    def _express(self, channel: str, event: TurnEvent) -> bool:
        """Write a live event straight to the client, if it is the next one, not the end, and
        the connection has nothing buffered; whether it did. Called by the pub/sub reader only
        while the stream waits in ``_wait`` with its backlog, log reads and gaps all done."""
        writer = self._writer
        if (writer is None or event.terminal or channel != self._live_channel
                or event.seq != self.last_seq + 1 or not writer.ready()):
            return False
        self._counters.writes += 1
        self._counters.direct_writes += 1
        writer.write(self._sending(event))
        return True

    async def next_frame(self) -> bytes | _Idle | None:
        if self._ended:
            return None
        try:
            event = await self._next_event()
        except (RedisError, OSError) as exc:
            log.warning("stream of %s stopped, Redis failed: %s", self.message_id, exc)
            self.stop_cause = "redis_failed"
            return None
        if event is None or isinstance(event, _Idle):
            return event
        if isinstance(event, _NotStarted):
            if self.sent:
                return IDLE  # the timer fired as the first event went out
            self._ended = self.not_started = True
            return self._not_started_frame()
        self._counters.writes += 1
        return self._sending(event)

    def ready_frames(self, limit: int) -> list[bytes]:
        """Frames that can go out now without waiting, in order, at most ``limit``: what a
        write merges with the frame before it. Each keeps its own ``id:`` line, so a client
        that is cut mid-write resumes after the last frame it parsed whole."""
        frames: list[bytes] = []
        while len(frames) < limit and not self._ended:
            event = self._ready_event()
            if event is None:
                break
            frames.append(self._sending(event))
        return frames

    def _sending(self, event: TurnEvent) -> bytes:
        self._counters.frames += 1
        self.last_seq = event.seq
        self.sent += 1
        if self._first_event_timer is not None:
            self._first_event_timer.cancel()
            self._first_event_timer = None
        self._ended = event.terminal
        return event.frame

    def _ready_event(self) -> TurnEvent | None:
        """The next event if it is here already and next in line; anything else (a gap, a
        resync, another channel's event) is left for ``_next_event``."""
        while self._backlog:
            event = self._backlog[0]
            if event.seq > self.last_seq + 1:
                return None
            self._backlog.popleft()
            if event.seq == self.last_seq + 1:
                return event
        if self._log_may_hold_more or self._gap_event is not None or self._held is not None:
            return None
        stream_id = self.route.stream_id
        item = self._subscription.get_nowait()
        if item is None:
            return None
        if (isinstance(item, tuple) and stream_id is not None
                and item[0] == self._channel_for(stream_id)
                and item[1].seq == self.last_seq + 1):
            return item[1]
        self._held = item
        return None

    def _not_started_frame(self) -> bytes:
        # ASCII JSON (ensure_ascii): the message id from the path cannot break the frame.
        return encode_frame(json.dumps({
            "event": "error", "message_id": self.message_id, "status": 504,
            "code": "turn_not_started",
            "message": (f"the turn has published nothing within "
                        f"{self._first_event_timeout:g}s: it may not have been enqueued, "
                        f"or may still be waiting for a worker"),
        }, separators=(",", ":")))

    async def _next_event(self) -> TurnEvent | _NotStarted | _Idle | None:
        while True:
            while self._backlog:
                event = self._backlog.popleft()
                if event.seq > self.last_seq:
                    return event
            stream_id = self.route.stream_id
            if self._log_may_hold_more and stream_id is not None:
                page = await self._log.read_after(stream_id, self.last_seq)
                if page:
                    self._subscription.held_through(self._channel_for(stream_id), page[-1].seq)
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
            item = await self._wait()
            if isinstance(item, _NotStarted | _Idle):
                return item
            if isinstance(item, _Resync):
                if not await self._subscription.wait_ready(self._resubscribe_timeout):
                    log.warning("stream of %s stopped: pub/sub not back within %.0fs",
                                self.message_id, self._resubscribe_timeout)
                    self.stop_cause = "pubsub_not_back"
                    return None
                # Every stream of the process re-reads its log now: spread over a moment, and
                # queued for the log's connections (ReplayLog), so that none of them times out.
                await self._log.spread_reread()
                if self.route.stream_id is None:
                    await self._settled(await self.route.settle(self._log))
                self._log_may_hold_more = self.route.stream_id is not None
                continue
            channel, event = item
            if stream_id is None:
                # Undecided: this event decides. It is not relayed from here; the log read
                # that follows has it (and anything before it) if the route is the message's.
                if channel == self._channel_for(self.route.refusal):
                    decided = self.route.refusal
                else:
                    decided = self.route.decide(await self._log.owner_of(self.message_id))
                await self._settled(decided)
                self._log_may_hold_more = True
            elif channel != self._channel_for(stream_id):
                continue  # queued by a channel let go of since
            elif event.seq == self.last_seq + 1:
                return event
            elif event.seq > self.last_seq:
                self._gap_event = event
                self._log_may_hold_more = True

    async def _settled(self, stream_id: str | None) -> None:
        if stream_id is not None:
            self.route.stream_id = stream_id
            await keep_only(self._hub, self._subscription, self._channel_for(stream_id))
            log.info("stream of turn %s for user %s routed to %s", self.message_id,
                     self.user_id, self.route.kind)

    async def _wait(self) -> tuple[str, TurnEvent] | _Resync | _NotStarted | _Idle:
        """The next live item: an event, a resync, or a wake-up (``NOT_STARTED`` once the first
        event is overdue, ``IDLE`` when the response wants to ping)."""
        if self._held is not None:
            held, self._held = self._held, None
            return held
        stream_id = self.route.stream_id
        if self._writer is None or stream_id is None:
            return await self._subscription.get()
        self._live_channel = self._channel_for(stream_id)
        self._subscription.express = self._express
        try:
            return await self._subscription.get()
        finally:
            self._subscription.express = None

    async def aclose(self, reason: CloseReason) -> None:
        if self._first_event_timer is not None:
            self._first_event_timer.cancel()
        await self._hub.unsubscribe(self._subscription)
        if self.not_started:
            outcome = "turn_not_started"
        elif reason is CloseReason.ENDED:
            outcome = "turn_ended" if self._ended else (self.stop_cause or "redis_failed")
        else:
            outcome = reason.value
        self._counters.open -= 1
        self._counters.closed[outcome] += 1
        level = logging.WARNING if outcome in CUT_CAUSES else logging.INFO
        log.log(level, "stream of turn %s for user %s closed (%s, %s stream): %d events sent, "
                "last seq %d", self.message_id, self.user_id, outcome, self.route.kind,
                self.sent, self.last_seq)
