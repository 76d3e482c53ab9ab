"""Server-Sent Events framing, read back with the tests' spec-following parser."""

from __future__ import annotations

from gateway.sse import PING_FRAME, STREAM_HEADERS, encode_frame
from tests.conftest import SSEFrame, SSEParser


def parse(raw: bytes) -> list[SSEFrame]:
    parser = SSEParser()
    frames = [parser.feed(line) for line in raw.decode().split("\n")]
    return [frame for frame in frames if frame is not None]


def test_a_data_frame_carries_its_id_and_the_json_unchanged() -> None:
    data = '{"event":"agent_message","answer":"naïve: 1","seq":7}'

    raw = encode_frame(data, event_id=7)

    assert raw == f"id: 7\ndata: {data}\n\n".encode()
    assert parse(raw) == [SSEFrame(event=None, id="7", data=data)]


def test_line_breaks_in_data_become_data_lines_and_read_back_the_same() -> None:
    raw = encode_frame("one\ntwo\r\nthree", event="note")

    assert raw == b"event: note\ndata: one\ndata: two\ndata: three\n\n"
    assert parse(raw) == [SSEFrame(event="note", id=None, data="one\ntwo\nthree")]


def test_unicode_line_separators_in_data_stay_inside_their_data_line() -> None:
    """The worker's JSON carries U+2028, U+0085 and the like unescaped; SSE ends lines at CR
    and LF only, so splitting at them would hand a client JSON with a raw line feed."""
    data = '{"answer":"a\u2028b\u2029c\x85d\x0be\x1cf","seq":1}'

    raw = encode_frame(data, event_id=1)

    assert raw == f"id: 1\ndata: {data}\n\n".encode()
    assert [frame.data for frame in parse(raw)] == [data]


def test_the_ping_is_difys_keepalive_frame() -> None:
    assert PING_FRAME == b"event: ping\n\n"
    assert parse(PING_FRAME) == [SSEFrame(event="ping", id=None, data="")]


def test_the_stream_headers_turn_off_proxy_buffering() -> None:
    assert STREAM_HEADERS == {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
