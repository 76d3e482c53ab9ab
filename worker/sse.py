"""An incremental parser for ``text/event-stream``, fed bytes as they come off the socket.

It follows the WHATWG rules that matter for the backend: lines end in CRLF, LF or CR (a CR at the
end of one chunk and the LF at the start of the next are one line end), ``data`` lines join with
LF, comment lines (``: keepalive``) carry nothing, and a frame is dispatched on a blank line. A
frame or line larger than ``max_frame_bytes`` is refused rather than buffered, so a broken or
hostile backend cannot grow the worker's memory without bound.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass


class SseFrameTooLarge(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class SseFrame:
    event_id: str | None
    event: str | None
    data: str


class SseParser:
    def __init__(self, max_frame_bytes: int = 4 * 1024 * 1024) -> None:
        self._max_frame_bytes = max_frame_bytes
        self._pending = b""
        self._skip_lf = False
        self._event_id: str | None = None
        self._event: str | None = None
        self._data: list[str] = []
        self._frame_bytes = 0
        self._saw_field = False

    @property
    def mid_frame(self) -> bool:
        """True when a frame was started but not finished: the stream ended early."""
        return self._saw_field or bool(self._pending)

    def feed(self, chunk: bytes) -> Iterator[SseFrame]:
        if not chunk:
            return
        buffer = self._pending + chunk
        start = 0
        if self._skip_lf and buffer.startswith(b"\n"):
            start = 1
        self._skip_lf = False
        length = len(buffer)
        while start < length:
            lf = buffer.find(b"\n", start)
            cr = buffer.find(b"\r", start, lf if lf != -1 else length)
            if cr != -1:
                end, next_start = cr, cr + 1
                if next_start < length and buffer[next_start] == 0x0A:
                    next_start += 1
                elif next_start == length:
                    self._skip_lf = True
            elif lf != -1:
                end, next_start = lf, lf + 1
            else:
                break
            frame = self._line(buffer[start:end])
            start = next_start
            if frame is not None:
                yield frame
        self._pending = buffer[start:]
        if len(self._pending) + self._frame_bytes > self._max_frame_bytes:
            raise SseFrameTooLarge(f"an SSE frame exceeds {self._max_frame_bytes} bytes")

    def _line(self, raw: bytes) -> SseFrame | None:
        if not raw:
            return self._dispatch()
        self._frame_bytes += len(raw)
        if self._frame_bytes > self._max_frame_bytes:
            raise SseFrameTooLarge(f"an SSE frame exceeds {self._max_frame_bytes} bytes")
        line = raw.decode("utf-8", errors="replace")
        if line.startswith(":"):
            return None
        field, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        self._saw_field = True
        if field == "data":
            self._data.append(value)
        elif field == "event":
            self._event = value
        elif field == "id" and "\x00" not in value:
            self._event_id = value
        return None

    def _dispatch(self) -> SseFrame | None:
        frame = None
        if self._data or self._event is not None:
            frame = SseFrame(self._event_id, self._event, "\n".join(self._data))
        self._event = None
        self._data = []
        self._frame_bytes = 0
        self._saw_field = False
        return frame
