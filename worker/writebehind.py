"""Writes queued by the caller and sent together by a writer, off the caller's path.

Celery's consumer takes each message on its path to the next one. Two writes used to sit there
per message, each a round trip that waits for a turn of a busy gevent hub: kombu's unacked
record (worker/broker.py) and the delivery's listing (worker/takeover.py). That held a burst
of a thousand turns to about a hundred messages a second (docs/performance.md). Both are now
queued here, and a writer (a thread; a greenlet under gevent) sends all that has queued up
since its last round trip in one. The turns' progress reports (worker/progress.py) go the same
way.

Whoever must not act before a write waits for it: ``put`` returns an event that is set once
the round trip that carried the key's latest value is over, sent or failed (``send`` logs its
own failures); ``written`` finds that event later, until the round trip is over. A later
value for the same key replaces one not sent yet, so a listing undone before it went out is
never sent, and its waiter is still released. ``withdraw`` takes a value back: dropped if not
sent yet, waited for if its round trip is under way.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

Value = TypeVar("Value")


class WriteBehind(Generic[Value]):
    """Values by key, sent in batches by ``send`` (called with every queued key and value, in
    the order they were last queued) on a writer started by ``start``.

    After ``close`` there is no writer: what is queued then is sent at once, by the caller.
    """

    def __init__(self, send: Callable[[dict[str, Value]], None], *, name: str) -> None:
        self._send = send
        self._name = name
        self._guard = threading.Lock()
        self._wake = threading.Event()
        self._pending: dict[str, Value] = {}
        self._written: dict[str, threading.Event] = {}
        # Key -> the event of the round trip carrying its value, while that is under way.
        self._sending: dict[str, threading.Event] = {}
        self._writer: threading.Thread | None = None
        self._closed = False

    def put(self, key: str, value: Value) -> threading.Event:
        with self._guard:
            self._pending.pop(key, None)  # re-queued last: the batch keeps the latest order
            self._pending[key] = value
            written = self._written.setdefault(key, threading.Event())
            closed = self._closed
        if closed:
            self.flush()
        else:
            self._wake.set()
        return written

    def written(self, key: str) -> threading.Event | None:
        """Set once the key's latest value is sent (or failed); None if none is queued or on
        its way. A value whose round trip is under way counts as not written yet: a waiter
        must not go on in the moment between the writer taking the batch and Redis having it."""
        with self._guard:
            return self._written.get(key) or self._sending.get(key)

    def withdraw(self, key: str) -> None:
        """Drop the key's value if it is not sent yet (its waiters are released); if a round
        trip carrying it is under way, return once that is over."""
        with self._guard:
            self._pending.pop(key, None)
            queued = self._written.pop(key, None)
            sending = self._sending.get(key)
        if queued is not None:
            queued.set()
        if sending is not None:
            sending.wait()

    def start(self) -> None:
        """Start the writer, unless it runs or this was closed."""
        with self._guard:
            if self._writer is not None or self._closed:
                return
            self._writer = threading.Thread(target=self._write_until_closed, daemon=True,
                                            name=self._name)
            self._writer.start()

    def close(self, timeout: float) -> None:
        """End the writer and send what is queued."""
        with self._guard:
            self._closed = True
            writer, self._writer = self._writer, None
        self._wake.set()
        if writer is not None and writer is not threading.current_thread():
            writer.join(timeout)
        self.flush()

    def flush(self) -> None:
        """Send everything queued, in one call of ``send``."""
        with self._guard:
            batch, self._pending = self._pending, {}
            written = {key: self._written.pop(key) for key in batch if key in self._written}
            self._sending.update(written)
        if not batch:
            return
        try:
            self._send(batch)
        finally:
            with self._guard:
                for key, event in written.items():
                    if self._sending.get(key) is event:
                        del self._sending[key]
            for event in written.values():
                event.set()

    def _write_until_closed(self) -> None:
        while not self._closed:
            self._wake.wait()
            self._wake.clear()
            try:
                self.flush()
            except Exception:  # send logs what it expects; the writer must outlive the rest
                log.exception("%s: a batch of writes failed", self._name)
