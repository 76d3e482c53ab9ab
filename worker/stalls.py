"""The event streams' read time-out, kept by one watcher for all of them, not by a timer per read.

A socket with a time-out arms a timer for every read that has to wait: under gevent a
``Timeout`` started on the hub and cancelled again for every event of every stream, a heap
operation in libev each way among a thousand streams' timers. Reading the streams of 600
turns on gevent (``bench.stream_path --turns 600``, read mode), those timers were 12-18% of
what an event cost to read, 9-13 µs of 70-75 (docs/performance.md, *Fifth session of
2026-12-07*); at 200 turns they were within the noise.

So once a stream's headers are in, its socket reads without a time-out, and a ``StallWatch``
looks at every stream it holds once per quarter of the time-out. A stream that has received no
byte (keepalives count) for ``read_timeout`` seconds is shut down, which ends its blocked read
at once, under gevent and under threads alike; its reader sees ``timed_out`` and resumes the
stream as it would after a socket time-out. A silent stream is so cut between 1 and 1.25 times
``read_timeout`` after its last byte. The watcher is a thread (a greenlet under gevent), started
with the first stream, and again in a forked child, which does not inherit its parent's.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time


class WatchedStream:
    """One stream's reader, as the watcher sees it: waiting on its socket since ``waiting_since``
    (stamped by ``waits``), or busy with what it read (``busy``), which is not silence: a
    socket time-out would not run either while its reader is away handling an event."""

    __slots__ = ("_sock", "busy", "timed_out", "waiting_since")

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.waiting_since = time.monotonic()
        self.busy = False
        self.timed_out = False

    def waits(self) -> None:
        self.waiting_since = time.monotonic()
        self.busy = False

    def cut(self) -> None:
        self.timed_out = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)


class StallWatch:
    def __init__(self, read_timeout: float, *, name: str = "stream-stall-watch") -> None:
        self.read_timeout = read_timeout
        self._period = read_timeout / 4
        self._name = name
        self._streams: set[WatchedStream] = set()
        self._guard = threading.Lock()
        self._closed = threading.Event()
        self._watcher: threading.Thread | None = None
        self._watcher_pid = 0

    def watch(self, sock: socket.socket) -> WatchedStream | None:
        """Take the stream's time-out over: its socket then reads without one of its own.
        None once closed: the socket keeps its time-out."""
        stream = WatchedStream(sock)
        with self._guard:
            if self._closed.is_set():
                return None
            self._streams.add(stream)
            if self._watcher is None or self._watcher_pid != os.getpid():  # none, or forked
                self._watcher = threading.Thread(target=self._watch_until_closed, daemon=True,
                                                 name=self._name)
                self._watcher_pid = os.getpid()
                self._watcher.start()
        sock.settimeout(None)
        return stream

    def forget(self, stream: WatchedStream) -> None:
        with self._guard:
            self._streams.discard(stream)

    def sweep(self) -> int:
        """Cut every stream silent for ``read_timeout``; return how many were cut."""
        deadline = time.monotonic() - self.read_timeout
        with self._guard:
            stalled = [stream for stream in self._streams
                       if not stream.busy and stream.waiting_since <= deadline]
            self._streams.difference_update(stalled)
        for stream in stalled:
            stream.cut()
        return len(stalled)

    def close(self) -> None:
        self._closed.set()
        with self._guard:
            watcher, self._watcher = self._watcher, None
        if watcher is not None and watcher is not threading.current_thread():
            watcher.join(self._period + 1.0)

    def _watch_until_closed(self) -> None:
        while not self._closed.wait(self._period):
            self.sweep()
