"""One run's event log as a ``text/event-stream``: replay after a cursor, follow live, keepalives,
and the scripted stream faults (drop, stall, garbage, injected frames).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from stub_backend.control import StreamFault
from stub_backend.runs import TERMINAL_EVENT_TYPES, Run, StubState

__all__ = ["KEEPALIVE_FRAME", "SSEResponse", "install_drop_log_filter"]

class _DeliberateDrop(Exception):
    """Raised inside a stream to make uvicorn abort the connection mid-response."""


class _DropLogFilter(logging.Filter):
    """Keep scripted connection drops out of the error log; they are not server bugs."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, _DeliberateDrop)


def install_drop_log_filter() -> None:
    """Install (once) the filter that keeps scripted drops out of uvicorn's error log."""
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(existing, _DropLogFilter) for existing in logger.filters):
        logger.addFilter(_DropLogFilter())


KEEPALIVE_FRAME = b": keepalive\n\n"


class SSEResponse(Response):
    """Streams one run's events, replaying after a cursor and then following live.

    Written as a raw ASGI response (not ``StreamingResponse``) because the faults need control
    that a generator does not give: aborting the connection without the closing chunk, and
    staying silent while still noticing that the client went away.
    """

    media_type = "text/event-stream"

    def __init__(
        self, state: StubState, run: Run, after: tuple[int, int], fault: StreamFault | None
    ) -> None:
        # Deliberately not Response.__init__: it would declare "content-length: 0".
        self.status_code = 200
        self.background = None
        self.raw_headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
        ]
        self.state = state
        self.run = run
        self.after = after
        self.fault = fault

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        writer = asyncio.ensure_future(self._write(send))
        watcher = asyncio.ensure_future(self._wait_for_disconnect(receive))
        try:
            await asyncio.wait({writer, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            writer.cancel()
            watcher.cancel()
            await asyncio.wait({writer, watcher})  # let both settle; never raises
        if writer.cancelled():
            return  # the client went away; there is nobody left to finish the response for
        failure = writer.exception()
        if failure is not None:
            # Propagating makes uvicorn close the transport without the final chunk.
            raise failure
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    @staticmethod
    async def _wait_for_disconnect(receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    async def _write(self, send: Send) -> None:
        run, fault, state = self.run, self.fault, self.state
        keepalive = state.settings.keepalive_interval

        async def emit(chunk: bytes) -> None:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})

        index = run.index_after(self.after)
        sent = 0
        garbage_done = False
        while not (state.shutting_down or run.discarded):
            if index >= len(run.events) and run.ended:
                return
            if fault is not None and fault.drop_after == sent:
                raise _DeliberateDrop(f"scripted drop after {sent} frames")
            if fault is not None and fault.stall_after == sent:
                await self._stall(fault.stall_seconds)
                return
            if index < len(run.events):
                event = run.events[index]
                if fault is not None and fault.garbage_after == sent and not garbage_done:
                    garbage_done = True
                    await emit(
                        f"id: {event.cursor}\nevent: pydantic_ai_event\n"
                        "data: {this is not json\n\n".encode()
                    )
                if fault is not None and fault.inject_after == sent and not garbage_done:
                    garbage_done = True
                    await emit((fault.frame or "").encode())
                await emit(event.frame)
                index += 1
                sent += 1
                if event.type in TERMINAL_EVENT_TYPES:
                    return
                continue
            changed = run.changed
            try:
                async with asyncio.timeout(keepalive):
                    await changed.wait()
            except TimeoutError:
                await emit(KEEPALIVE_FRAME)

    async def _stall(self, seconds: float | None) -> None:
        # Silence until the time is up, the client leaves (the watcher cancels us) or shutdown.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self.state.shutdown_event.wait()
