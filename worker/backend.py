"""The dify-agent client: create a run, then follow its event stream to the terminal event.

The wire contract is ../shared/agent-protocol.md. Two promises matter to the turn:

- ``create_run`` is never retried here: a POST whose answer was lost may have started a run, and
  only the caller (with the run's idempotency key and the message row) can decide what to do.
- ``stream_events`` yields each event once, in order, up to and including the first terminal
  event. A broken connection, a read time-out (no byte, keepalives included, for
  ``read_timeout`` seconds while the reader waits; kept by worker/stalls.py, which cuts a
  silent stream within a quarter of that more), a 5xx or an early end of stream is resumed
  from the last event id, up to ``max_reconnects`` times in a row without progress; so a
  dropped connection never costs a second backend run. 4xx answers, redirects, undecodable
  frames and invalid events fail at once.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import requests
from requests.adapters import HTTPAdapter

from worker import fastjson
from worker.errors import (
    AgentBackendError,
    BackendUnavailable,
    ProtocolViolation,
    RunRejected,
    StreamInterrupted,
    TurnInterrupted,
)
from worker.sse import SseFrameTooLarge, SseParser
from worker.stalls import StallWatch

log = logging.getLogger(__name__)

TERMINAL_EVENT_TYPES = frozenset({"run_succeeded", "run_failed", "run_cancelled"})
KNOWN_EVENT_TYPES = TERMINAL_EVENT_TYPES | {"run_started", "pydantic_ai_event"}
START_CURSOR = "0-0"


def socket_of(response: requests.Response) -> socket.socket | None:
    """The socket a streamed response reads from; None once it is closed.

    requests offers no handle on it; urllib3 keeps it on the response's connection. The stall
    watch and the supervisor's stop both shut it down to end a blocked read from elsewhere.
    """
    return getattr(getattr(response.raw, "_connection", None), "sock", None)


class StreamWatcher(Protocol):
    """Lets a supervisor interrupt a stream from another thread (see worker.supervisor)."""

    @property
    def stopped(self) -> bool: ...

    def attach_response(self, response: requests.Response) -> None: ...

    def detach_response(self) -> None: ...


@dataclass(frozen=True, slots=True)
class RunEvent:
    """One validated event of a run."""

    event_id: str
    type: str
    data: dict[str, Any]
    answer_delta: str | None

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL_EVENT_TYPES


def answer_delta_of(envelope: dict[str, Any]) -> str | None:
    """The answer text an event adds, if any.

    The server says so itself in ``agent_message_delta``; when a server leaves that field out,
    the text parts are read instead. Thinking parts and tool calls are never answer text.
    """
    if "agent_message_delta" in envelope:
        delta = envelope["agent_message_delta"]
        return delta if isinstance(delta, str) and delta else None
    data = envelope.get("data") or {}
    kind = data.get("event_kind")
    if kind == "part_start":
        part = data.get("part") or {}
        if part.get("part_kind") == "text" and isinstance(part.get("content"), str):
            return part["content"] or None
    elif kind == "part_delta":
        delta = data.get("delta") or {}
        if delta.get("part_delta_kind") == "text" and isinstance(delta.get("content_delta"), str):
            return delta["content_delta"] or None
    return None


def parse_event(raw_data: str, run_id: str) -> RunEvent | None:
    """Validate one SSE ``data`` payload; None for event types this worker does not know.

    Unknown event types are skipped rather than fatal so that a backend that adds a new kind of
    progress event does not break every turn; everything the worker relies on is checked.
    """
    try:
        envelope = fastjson.decode(raw_data)
    except ValueError as exc:
        raise ProtocolViolation(f"undecodable event frame: {exc}", run_id=run_id) from None
    if isinstance(envelope, dict) and isinstance(envelope.get("type"), str) \
            and envelope["type"] in TERMINAL_EVENT_TYPES:
        # The terminal event carries the session snapshot that is saved: every digit counts.
        envelope = fastjson.decode_exact(raw_data)
    if not isinstance(envelope, dict):
        raise ProtocolViolation("event frame is not a JSON object", run_id=run_id)
    event_id, event_type, data = envelope.get("id"), envelope.get("type"), envelope.get("data")
    if not isinstance(event_id, str) or not event_id:
        raise ProtocolViolation("event without an id", run_id=run_id)
    if not isinstance(event_type, str):
        raise ProtocolViolation(f"event {event_id} has no type", run_id=run_id)
    if envelope.get("run_id") not in (None, run_id):
        raise ProtocolViolation(f"event {event_id} belongs to another run", run_id=run_id)
    if not isinstance(data, dict):
        raise ProtocolViolation(f"event {event_id} ({event_type}) has no data object",
                                run_id=run_id)
    if event_type not in KNOWN_EVENT_TYPES:
        log.info("skipping unknown backend event type %r (run %s)", event_type, run_id)
        return None
    delta = envelope.get("agent_message_delta")
    if delta is not None and not isinstance(delta, str):
        raise ProtocolViolation(f"event {event_id}: agent_message_delta is not text", run_id=run_id)
    if event_type == "run_succeeded":
        _check_succeeded(data, event_id, run_id)
    elif event_type == "run_failed" and not isinstance(data.get("error"), str):
        raise ProtocolViolation(f"event {event_id}: run_failed without an error", run_id=run_id)
    return RunEvent(event_id, event_type, data,
                    answer_delta_of(envelope) if event_type == "pydantic_ai_event" else None)


def _check_succeeded(data: dict[str, Any], event_id: str, run_id: str) -> None:
    snapshot = data.get("session_snapshot")
    if snapshot is not None and not isinstance(snapshot, dict):
        raise ProtocolViolation(f"event {event_id}: session_snapshot is not an object",
                                run_id=run_id)
    if "output" not in data and "deferred_tool_call" not in data:
        raise ProtocolViolation(f"event {event_id}: run_succeeded carries no output",
                                run_id=run_id)
    usage = data.get("usage")
    if usage is not None and not isinstance(usage, dict):
        raise ProtocolViolation(f"event {event_id}: usage is not an object", run_id=run_id)


class AgentBackendClient:
    """A pooled, thread-safe client of one dify-agent server."""

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        connect_timeout: float = 5.0,
        read_timeout: float = 45.0,
        max_reconnects: int = 5,
        reconnect_delay: float = 0.25,
        max_frame_bytes: int = 4 * 1024 * 1024,
        pool_size: int = 64,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._timeouts = (connect_timeout, read_timeout)
        self._max_reconnects = max_reconnects
        self._reconnect_delay = reconnect_delay
        self._max_frame_bytes = max_frame_bytes
        # Keeps the event streams' read time-out once their headers are in (worker/stalls.py).
        self._stalls = StallWatch(read_timeout)
        # Requests are prepared here and sent through the adapter (``_send``), not a Session.
        self._adapter = HTTPAdapter(pool_connections=4, pool_maxsize=pool_size, max_retries=0)
        self._headers = {"User-Agent": requests.utils.default_user_agent(), "Accept": "*/*",
                         "Accept-Encoding": "identity", "Connection": "keep-alive"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        # Proxy and CA bundle settings are read from the environment once, here, for the one
        # server this client talks to (requests would read them again for every request).
        self._proxies = requests.utils.get_environ_proxies(self.base_url)
        self._verify: bool | str = (os.environ.get("REQUESTS_CA_BUNDLE")
                                    or os.environ.get("CURL_CA_BUNDLE") or True)

    def close(self) -> None:
        self._stalls.close()
        self._adapter.close()

    def _send(self, method: str, path: str, *, body: Any = None,
              params: dict[str, str] | None = None, headers: dict[str, str] | None = None,
              stream: bool = False) -> requests.Response:
        """One request, prepared here and sent through the adapter's connection pool.

        ``Session.request`` merges the session's cookies, hooks, auth and environment into each
        request and follows redirects: 0.45 of the 1.2 ms of CPU a request cost on the
        development machine (two per turn), for settings this client never uses. A redirect
        is not followed, and is refused (``_raise_for_status``): the backend has no reason to
        send one, and requests would have turned a redirected POST into a GET.
        """
        request = requests.PreparedRequest()
        all_headers = self._headers if headers is None else {**self._headers, **headers}
        if body is not None:
            all_headers = {**all_headers, "Content-Type": "application/json"}
        request.prepare(method=method, url=self.base_url + path, headers=all_headers,
                        params=params, data=None if body is None else fastjson.encode(body))
        return self._adapter.send(request, stream=stream, timeout=self._timeouts,
                                  verify=self._verify, proxies=self._proxies)

    def create_run(self, body: dict[str, Any], *, message_id: str | None = None) -> str:
        try:
            response = self._send("POST", "/runs", body=body)
        except requests.RequestException as exc:
            raise BackendUnavailable(f"creating the run failed: {_why(exc)}",
                                     message_id=message_id) from exc
        with response:
            _raise_for_status(response, "creating the run", message_id=message_id)
            try:
                answer = response.json()
            except ValueError:
                answer = None
        run_id = answer.get("run_id") if isinstance(answer, dict) else None
        if not isinstance(run_id, str) or not run_id:
            raise ProtocolViolation("the create-run answer carries no run_id",
                                    message_id=message_id)
        return run_id

    def get_run(self, run_id: str) -> dict[str, Any]:
        try:
            response = self._send("GET", f"/runs/{run_id}")
        except requests.RequestException as exc:
            raise BackendUnavailable(f"reading the run failed: {_why(exc)}",
                                     run_id=run_id) from exc
        with response:
            _raise_for_status(response, "reading the run", run_id=run_id)
            return response.json()

    def cancel_run(self, run_id: str, *, reason: str = "user_stop") -> bool:
        """Ask the backend to stop a run; False when it had already ended."""
        try:
            response = self._send("POST", f"/runs/{run_id}/cancel", body={"reason": reason})
        except requests.RequestException as exc:
            raise BackendUnavailable(f"cancelling the run failed: {_why(exc)}",
                                     run_id=run_id) from exc
        with response:
            if response.status_code == 409:
                return False
            _raise_for_status(response, "cancelling the run", run_id=run_id)
            return True

    def stream_events(
        self,
        run_id: str,
        *,
        after: str = START_CURSOR,
        message_id: str | None = None,
        watcher: StreamWatcher | None = None,
    ) -> Iterator[RunEvent]:
        last_event_id = after
        failures_in_a_row = 0
        while True:
            try:
                for event in self._stream_once(run_id, last_event_id, watcher):
                    last_event_id = event.event_id
                    failures_in_a_row = 0
                    yield event
                    if event.terminal:
                        return
                why = "the stream ended before a terminal event"
            except _Resumable as exc:
                why = str(exc)
            except AgentBackendError as exc:
                raise exc.with_ids(run_id=run_id, message_id=message_id) from None
            if watcher is not None and watcher.stopped:
                raise TurnInterrupted("the turn was interrupted while streaming",
                                      run_id=run_id, message_id=message_id)
            failures_in_a_row += 1
            if failures_in_a_row > self._max_reconnects:
                raise StreamInterrupted(
                    f"event stream lost after {self._max_reconnects} reconnects "
                    f"(last event {last_event_id}): {why}",
                    run_id=run_id, message_id=message_id,
                )
            log.warning("event stream of run %s broke (%s); resuming after %s",
                        run_id, why, last_event_id)
            time.sleep(min(self._reconnect_delay * 2 ** (failures_in_a_row - 1), 5.0))

    def _stream_once(
        self, run_id: str, after: str, watcher: StreamWatcher | None
    ) -> Iterator[RunEvent]:
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
        if after != START_CURSOR:
            headers["Last-Event-ID"] = after
        try:
            response = self._send("GET", f"/runs/{run_id}/events/sse", params={"after": after},
                                  headers=headers, stream=True)
        except requests.RequestException as exc:
            raise _Resumable(_why(exc)) from exc
        with response:
            if response.status_code >= 500 or response.status_code == 429:
                raise _Resumable(f"HTTP {response.status_code} on the event stream")
            _raise_for_status(response, "opening the event stream", run_id=run_id)
            if watcher is not None:
                watcher.attach_response(response)
            sock = socket_of(response)
            stream = self._stalls.watch(sock) if sock is not None else None
            parser = SseParser(self._max_frame_bytes)
            try:
                for chunk in response.iter_content(chunk_size=None):
                    if stream is not None:
                        stream.busy = True
                    for frame in parser.feed(chunk):
                        if frame.event is not None and not frame.data:
                            continue
                        event = parse_event(frame.data, run_id)
                        if event is not None:
                            yield event
                    if stream is not None:
                        stream.waits()
            except SseFrameTooLarge as exc:
                raise ProtocolViolation(str(exc), run_id=run_id) from None
            except (requests.RequestException, OSError) as exc:
                if stream is not None and stream.timed_out:
                    raise _Resumable(self._stalled()) from exc
                raise _Resumable(_why(exc)) from exc
            finally:
                if stream is not None:
                    self._stalls.forget(stream)
                if watcher is not None:
                    watcher.detach_response()
            if stream is not None and stream.timed_out:
                raise _Resumable(self._stalled())

    def _stalled(self) -> str:
        return f"timed out (no byte for {self._stalls.read_timeout:g} s)"


class _Resumable(Exception):
    """A break in the event stream that reconnecting may mend."""


def _why(exc: BaseException) -> str:
    if isinstance(exc, requests.Timeout | requests.exceptions.ReadTimeout):
        return f"timed out ({type(exc).__name__})"
    return f"{type(exc).__name__}: {exc}"[:300]


def _raise_for_status(response: requests.Response, doing: str, **ids: str | None) -> None:
    status = response.status_code
    if status < 300:
        return
    if status < 400:
        raise RunRejected(f"{doing}: HTTP {status} (redirects are not followed)", **ids)
    detail = response.text[:300]
    if status >= 500 or status == 429:
        raise BackendUnavailable(f"{doing}: HTTP {status} {detail}", **ids)
    raise RunRejected(f"{doing}: HTTP {status} {detail}", **ids)
