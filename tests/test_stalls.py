"""The event streams' read time-out kept by one watcher (worker/stalls.py), on real sockets."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from worker.stalls import StallWatch, WatchedStream

READ_TIMEOUT = 0.4
BOUND_SECONDS = 5.0


@pytest.fixture
def watch() -> Iterator[StallWatch]:
    stalls = StallWatch(READ_TIMEOUT, name="test-stall-watch")
    yield stalls
    stalls.close()


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    reader, writer = socket.socketpair()
    reader.settimeout(BOUND_SECONDS)
    yield reader, writer
    reader.close()
    writer.close()


@pytest.fixture
def watched(
    watch: StallWatch, pair: tuple[socket.socket, socket.socket],
) -> tuple[WatchedStream, socket.socket, socket.socket]:
    """A stream the watch holds: (its handle, its reader's socket, the backend's end)."""
    reader, writer = pair
    stream = watch.watch(reader)
    assert stream is not None
    return stream, reader, writer


def read_until_closed(sock: socket.socket, until: dict[str, float]) -> None:
    while sock.recv(4096):
        pass
    until["closed"] = time.monotonic()


def test_a_silent_stream_is_cut_after_the_read_timeout_and_its_blocked_read_returns(
    watched: tuple[WatchedStream, socket.socket, socket.socket],
) -> None:
    stream, reader, _ = watched
    assert reader.gettimeout() is None, "the socket's own timer is off"
    started, until = time.monotonic(), {}
    blocked = threading.Thread(target=read_until_closed, args=(reader, until))
    blocked.start()
    blocked.join(BOUND_SECONDS)

    assert not blocked.is_alive(), "the blocked read was never cut"
    assert stream.timed_out
    assert READ_TIMEOUT <= until["closed"] - started < READ_TIMEOUT * 1.25 + 0.5


def test_a_stream_that_keeps_receiving_bytes_is_not_cut(
    watch: StallWatch, watched: tuple[WatchedStream, socket.socket, socket.socket],
) -> None:
    stream, reader, writer = watched
    ends_at = time.monotonic() + READ_TIMEOUT * 3
    while time.monotonic() < ends_at:
        writer.sendall(b": keepalive\n\n")
        assert reader.recv(4096)
        stream.waits()
        assert watch.sweep() == 0
        time.sleep(READ_TIMEOUT / 8)  # the backend's keepalive interval, shortened

    assert not stream.timed_out


def test_a_reader_busy_with_what_it_read_is_not_silence(
    watch: StallWatch, watched: tuple[WatchedStream, socket.socket, socket.socket],
) -> None:
    stream, _, _ = watched
    stream.busy = True
    stream.waiting_since -= READ_TIMEOUT * 10  # away far longer than the time-out

    assert watch.sweep() == 0 and not stream.timed_out
    stream.waits()
    stream.waiting_since -= READ_TIMEOUT * 10
    assert watch.sweep() == 1 and stream.timed_out


def test_a_forgotten_stream_is_never_cut(
    watch: StallWatch, watched: tuple[WatchedStream, socket.socket, socket.socket],
) -> None:
    stream, reader, writer = watched
    watch.forget(stream)
    stream.waiting_since -= READ_TIMEOUT * 10

    assert watch.sweep() == 0
    writer.sendall(b"still open")
    assert reader.recv(4096) == b"still open"


def test_after_close_a_socket_keeps_its_own_timeout(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    reader, _ = pair
    stalls = StallWatch(READ_TIMEOUT)
    stalls.close()

    assert stalls.watch(reader) is None
    assert reader.gettimeout() == BOUND_SECONDS
