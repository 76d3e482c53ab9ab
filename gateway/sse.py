"""Server-Sent Events on the wire: frames, keepalive pings, and a response that knows when to end.

The frames are Dify's chat streaming format — ``data: {json}`` and a blank line — with an ``id:``
line carrying the event's ``seq``, so that a browser's EventSource sends it back as
``Last-Event-ID`` when it reconnects. While no event is due, ``event: ping`` goes out every
``ping_interval`` seconds: proxies and load balancers close connections that look idle, and a
client can tell a quiet turn from a dead connection.

When several frames are ready at once (a burst, or a client that reads a little behind), they go
out in one write (``FrameSource.ready_frames``): the per-write cost of the server is paid once,
and the client still parses each frame, with its own ``id:``, as it would have.

Pings go out when nothing was sent for ``ping_interval`` (checked every half of it, so the gap
is at most one and a half intervals).

``EventStreamResponse`` stops streaming, whichever comes first, when its source says the stream
is over, when the client goes away, when a single write has waited ``send_timeout`` seconds for
the client to take bytes, or when the source says the client fell too far behind
(``on_too_slow``). Nothing here knows about Redis or turns: the source is anything with the
``FrameSource`` methods.
"""

from __future__ import annotations

import asyncio
import enum
import re
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Protocol

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

PING_FRAME = b"event: ping\n\n"

# What stops proxies from buffering or caching the stream (nginx honours X-Accel-Buffering).
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# The only line ends of the SSE format. Not ``str.splitlines``, which also breaks at U+2028,
# U+0085 and others that the worker's JSON carries unescaped inside strings: a client would
# join those data lines with "\n" and get JSON with a raw line feed in a string.
_SSE_LINE_END = re.compile(r"\r\n|\r|\n")


def encode_frame(data: str, *, event_id: int | None = None, event: str | None = None) -> bytes:
    """One SSE frame. A line break in ``data`` starts a new ``data:`` line, as the spec says."""
    lines = []
    if event_id is not None:
        lines.append(f"id: {event_id}")
    if event is not None:
        lines.append(f"event: {event}")
    lines.extend(f"data: {line}" for line in _SSE_LINE_END.split(data))
    return ("\n".join(lines) + "\n\n").encode()


# Where the gateway's app puts the uvicorn connection a request came on (``gateway.app``), so
# that a stream can write its live frames straight to it (``DirectWriter``).
UVICORN_CYCLE = "agent_turn.uvicorn_cycle"


class DirectWriter:
    """Writes a stream's live frames straight to its connection, from the pub/sub reader.

    Through the ASGI ``send``, every frame wakes the stream's task and passes uvicorn's send: at
    thousands of frames a second that was most of the gateway's CPU besides the write itself.
    While a stream waits with nothing queued and its connection has nothing buffered (the
    client keeps up), the reader writes the frame as one HTTP chunk, exactly the bytes uvicorn
    would write for it. Anything else goes the usual way: a frame that finds the connection's
    buffer non-empty (a slow client, whose backlog, merged writes and cut work as before), the
    end (uvicorn closes the body), and every frame of a server that is not uvicorn's httptools
    protocol, for which there is no writer.
    """

    __slots__ = ("_cycle", "_response", "_transport")

    def __init__(self, cycle: Any, response: EventStreamResponse) -> None:
        self._cycle = cycle
        self._transport = cycle.transport
        self._response = response

    @classmethod
    def for_scope(cls, scope: Scope, response: EventStreamResponse) -> DirectWriter | None:
        cycle = scope.get("extensions", {}).get(UVICORN_CYCLE)
        if cycle is None or getattr(cycle, "chunked_encoding", None) is not True \
                or not getattr(cycle, "response_started", False):
            return None
        return cls(cycle, response)

    def ready(self) -> bool:
        cycle, transport = self._cycle, self._transport
        return not (cycle.disconnected or cycle.response_complete or cycle.flow.write_paused
                    or transport.is_closing()) and transport.get_write_buffer_size() == 0

    def write(self, frame: bytes) -> None:
        self._transport.write(b"%x\r\n%b\r\n" % (len(frame), frame))
        self._response._sent_since_tick = True


class CloseReason(enum.Enum):
    """Why a stream stopped; the source is told, for its log line and its clean-up."""

    ENDED = "ended"
    CLIENT_GONE = "client_disconnected"
    TOO_SLOW = "client_too_slow"
    SEND_TIMEOUT = "send_timeout"
    CANCELLED = "cancelled"  # the server is shutting down


# At most this many frames go out in one write.
MERGED_FRAMES = 64


class _Idle:
    """What ``FrameSource.next_frame`` gives when it was ``poke``d while it waited."""


IDLE = _Idle()


class FrameSource(Protocol):
    async def next_frame(self) -> bytes | _Idle | None:
        """The next frame to send, waiting as long as it takes; ``IDLE`` if ``poke`` was called
        while it waited; None when the stream is over."""

    def ready_frames(self, limit: int) -> list[bytes]:
        """Frames after it that are ready now, without waiting (may be none)."""

    def poke(self) -> None:
        """Make a waiting ``next_frame`` return ``IDLE`` (time for a ping)."""

    def attach_writer(self, writer: DirectWriter | None) -> None:
        """Let the source write live frames itself to the client (None: it may not)."""

    def on_too_slow(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once the client has fallen too far behind to catch up."""

    async def aclose(self, reason: CloseReason) -> None:
        """Release what the stream held; called once, however it stopped."""


class EventStreamResponse(Response):
    """A ``text/event-stream`` response fed by a ``FrameSource``, with pings while it is idle.

    A stream that ends because the client is slow ends without the closing chunk: the client
    cannot take it anyway, and returning lets the server close the connection (uvicorn logs
    "returned without completing response" for it).
    """

    media_type = "text/event-stream"

    def __init__(self, source: FrameSource, *, ping_interval: float, send_timeout: float,
                 headers: Mapping[str, str] | None = None) -> None:
        self.status_code = 200
        self.background = None
        self.init_headers({**STREAM_HEADERS, **(headers or {})})
        self._source = source
        self._ping_interval = ping_interval
        self._send_timeout = send_timeout
        self._sending_since: float | None = None
        self._sent_since_tick = False
        self._quiet_since = 0.0
        # Why the stream is being cut (a slow client, a stuck send), once it is: one future
        # rather than a task per cause, as a stream's tasks are much of its memory.
        self._cut: asyncio.Future[CloseReason] | None = None
        self._scope: Scope = {}

    def cut(self, reason: CloseReason) -> None:
        if self._cut is not None and not self._cut.done():
            self._cut.set_result(reason)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._scope = scope
        loop = asyncio.get_running_loop()
        self._cut = cut = loop.create_future()
        self._source.on_too_slow(lambda: self.cut(CloseReason.TOO_SLOW))
        pump = asyncio.create_task(self._pump(send))
        gone = asyncio.create_task(_client_gone(receive))
        ticker = _Ticker.of_this_loop()
        self._quiet_since = loop.time()
        ticker.watch(self, min(self._ping_interval / 2, self._send_timeout / 4))
        error: BaseException | None = None
        try:
            await asyncio.wait({pump, gone, cut}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ticker.forget(self)
            for task in (pump, gone):
                task.cancel()
            await asyncio.gather(pump, gone, return_exceptions=True)
            if pump.done() and not pump.cancelled():
                error = pump.exception()
                reason = CloseReason.ENDED
            elif cut.done():
                reason = cut.result()
            elif gone.done() and not gone.cancelled():
                reason = CloseReason.CLIENT_GONE
            else:
                reason = CloseReason.CANCELLED
            cut.cancel()
            await self._source.aclose(reason)
        if error is not None:
            raise error

    async def _pump(self, send: Send) -> None:
        """Frames as they come, merged when several are ready, a ping when idle.

        Nothing per frame but the wait for it and the write: no task, timer or time-out is
        made for each one (at thousands of frames a second they were a third of the CPU).
        The pings and the send time-out are kept by the process's ``_Ticker`` instead.
        """
        loop = asyncio.get_running_loop()
        self._sending_since = loop.time()
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})
        self._source.attach_writer(DirectWriter.for_scope(self._scope, self))
        while True:
            self._sending_since = None
            frame = await self._source.next_frame()
            if frame is None:
                body, more_body = b"", False
            elif isinstance(frame, _Idle):
                body, more_body = PING_FRAME, True
            else:
                more = self._source.ready_frames(MERGED_FRAMES - 1)
                body, more_body = (b"".join((frame, *more)) if more else frame), True
                self._sent_since_tick = True
            self._sending_since = loop.time()
            await send({"type": "http.response.body", "body": body, "more_body": more_body})
            if not more_body:
                return

    def _check(self, now: float) -> None:
        """The ticker's look at this stream: ping it if it sent nothing for a ping interval;
        end it if one write has waited ``send_timeout`` for the client's socket."""
        started = self._sending_since
        if started is not None and now - started >= self._send_timeout:
            self.cut(CloseReason.SEND_TIMEOUT)
        elif self._sent_since_tick:
            self._sent_since_tick = False
            self._quiet_since = now
        elif now - self._quiet_since >= self._ping_interval and started is None:
            self._quiet_since = now
            self._source.poke()


class _Ticker:
    """One task per event loop that looks at every open stream now and then (``_check``).

    A task per stream that woke every few seconds cost as much, at thousands of streams, as
    a tenth of their frames; one pass over them all costs a few microseconds each.
    """

    _by_loop: ClassVar[dict[asyncio.AbstractEventLoop, _Ticker]] = {}

    def __init__(self) -> None:
        self._streams: set[EventStreamResponse] = set()
        self._interval = 1.0
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def of_this_loop(cls) -> _Ticker:
        loop = asyncio.get_running_loop()
        for other in [known for known in cls._by_loop if known.is_closed()]:
            del cls._by_loop[other]
        return cls._by_loop.setdefault(loop, cls())

    def watch(self, stream: EventStreamResponse, interval: float) -> None:
        self._streams.add(stream)
        self._interval = min(self._interval, interval) if len(self._streams) > 1 else interval
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="sse-ticker")

    def forget(self, stream: EventStreamResponse) -> None:
        self._streams.discard(stream)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while self._streams:
            await asyncio.sleep(self._interval)
            now = loop.time()
            for stream in list(self._streams):
                stream._check(now)


async def _client_gone(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
