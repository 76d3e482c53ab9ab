"""Watching the turns in flight: stop requests, deadlines and conversation leases.

A turn's thread spends its life blocked on the backend's event stream, so it cannot notice by
itself that a user pressed stop, that Flower revoked its task, or that its deadline passed. One
``TurnSupervisor`` thread per worker process does that for every turn at once:

- stop requests arrive on one pub/sub control channel (``stop_turn`` publishes there) and from
  Celery's revoked set (a revoke from Flower or ``celery control``), so noticing costs no polling
  of Redis per turn. A user's stop names the owner it comes from, and a turn obeys only its own
  owner's: a web tier that passes a user's ids through cannot stop another tenant's turn (the
  revoke is an operator's, by task id, and ``stop_turn`` sends it only for the owner's own task);
- a turn past its deadline is stopped the same way, with another reason;
- the worker's alive key is renewed every quarter of its TTL, in one pipelined round trip with
  the conversation leases that are due (``ConversationLocks.renew``). That renewal is the proof
  of life other workers go by (worker/takeover.py): a lease found in another's hands means the
  turn was taken over while this process was paused or cut off, and its copy here is stopped
  (``TAKEN_OVER``).

Stopping a turn sets its ``TurnControl`` flag, asks the backend to cancel the run (so the model is
not paid for further) and shuts the turn's stream socket, so the blocked read returns at once. A
turn taken over is stopped the same way, except that its run is not cancelled: the worker that
took it over is following that run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import redis

from worker.backend import AgentBackendClient, socket_of
from worker.errors import AgentBackendError
from worker.locks import ConversationLocks, Lease

log = logging.getLogger(__name__)

CONTROL_CHANNEL = "agent-turn:control"
STOPPED = "stopped"
DEADLINE = "deadline"
TAKEN_OVER = "taken_over"


def stop_key(message_id: str, owner: str) -> str:
    """Where ``owner``'s stop request waits for a turn that is not running yet.

    One key per requesting owner, so a request from anyone else neither stops the turn nor
    overwrites its owner's request: the turn reads only the key of the owner the store agreed
    to (``owner`` is a fingerprint, worker/ownership.py).
    """
    return f"agent-turn:stop:{message_id}:{owner}"


def stop_request(message_id: str, owner: str) -> str:
    """The control-channel message of ``owner``'s stop of ``message_id``."""
    return json.dumps({"stop": message_id, "owner": owner}, separators=(",", ":"))


@dataclass(eq=False)
class TurnControl:
    """What the supervisor knows of one turn in flight, and how it interrupts it."""

    task_id: str
    message_id: str
    # The fingerprint of the owner the store agreed to: the only one whose stop it obeys.
    owner: str
    deadline_at: float
    run_id: str | None = None
    lease: Lease | None = None
    stop_reason: str | None = None
    _response: Any = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def stopped(self) -> bool:
        return self.stop_reason is not None

    def attach_response(self, response: Any) -> None:
        """The stream being read now; shut on stop so the blocked read returns."""
        with self._lock:
            self._response = response
            stop_now = self.stopped
        if stop_now:
            _shut(response)

    def detach_response(self) -> None:
        with self._lock:
            self._response = None

    def interrupt(self, reason: str) -> bool:
        """Flag the turn and unblock its read; False if it was already flagged."""
        with self._lock:
            if self.stop_reason is not None:
                return False
            self.stop_reason = reason
            response = self._response
        if response is not None:
            _shut(response)
        return True


def _shut(response: Any) -> None:
    # requests exposes no way to interrupt a read from another thread; shutting the socket down
    # makes the blocked recv return at once, and the reader then sees the stop flag.
    sock = socket_of(response)
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


class TurnSupervisor:
    def __init__(
        self,
        redis_client: redis.Redis,
        backend: AgentBackendClient,
        locks: ConversationLocks,
        *,
        lease_ttl_seconds: float,
        tick_seconds: float = 0.1,
    ) -> None:
        self._redis = redis_client
        self._backend = backend
        self._locks = locks
        self._renew_every = lease_ttl_seconds / 4
        self._tick = tick_seconds
        self._controls: dict[str, TurnControl] = {}
        self._guard = threading.Lock()
        self._cancels = ThreadPoolExecutor(max_workers=4, thread_name_prefix="run-cancel")
        self._thread: threading.Thread | None = None
        self._closed = threading.Event()

    # Registration, from turn threads --------------------------------------------------------

    def register(self, task_id: str, message_id: str, *, owner: str,
                 deadline_seconds: float) -> TurnControl:
        control = TurnControl(task_id, message_id, owner, time.monotonic() + deadline_seconds)
        with self._guard:
            self._controls[message_id] = control
        self.start()
        return control

    def start(self) -> None:
        """Run the supervisor thread (a worker starts it when ready, to prove itself alive)."""
        with self._guard:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="turn-supervisor",
                                                daemon=True)
                self._thread.start()

    def unregister(self, control: TurnControl) -> None:
        with self._guard:
            if self._controls.get(control.message_id) is control:
                del self._controls[control.message_id]

    def stop_requested(self, message_id: str, owner: str) -> bool:
        """Whether ``owner`` asked to stop the turn before it ran."""
        try:
            return bool(self._redis.exists(stop_key(message_id, owner)))
        except redis.RedisError as exc:
            raise AgentBackendError(f"reading the stop flag failed: {exc}",
                                    message_id=message_id) from exc

    def stop_requested_on(self, pipe: redis.client.Pipeline, message_id: str,
                          owner: str) -> Callable[[Any], bool]:
        """Queue ``stop_requested`` on ``pipe``; the returned function reads its reply."""
        pipe.exists(stop_key(message_id, owner))

        def requested(reply: Any) -> bool:
            if isinstance(reply, Exception):
                raise AgentBackendError(f"reading the stop flag failed: {reply}",
                                        message_id=message_id)
            return bool(reply)

        return requested

    def in_flight(self) -> int:
        with self._guard:
            return len(self._controls)

    def interrupt(self, control: TurnControl, reason: str) -> None:
        """Stop one turn: flag it, shut its stream and cancel its backend run (unless the turn
        was taken over: the run goes on for the worker that has it now)."""
        if control.interrupt(reason):
            log.info("turn %s interrupted (%s)", control.message_id, reason)
            if reason != TAKEN_OVER:
                self.cancel_run_soon(control)

    def cancel_run_soon(self, control: TurnControl) -> None:
        if control.run_id is not None:
            self._cancels.submit(self._cancel_run, control.run_id, control.message_id)

    def _cancel_run(self, run_id: str, message_id: str) -> None:
        try:
            self._backend.cancel_run(run_id, reason="user_stop")
        except AgentBackendError as exc:
            log.warning("could not cancel run %s of turn %s: %s", run_id, message_id, exc)

    # The supervisor thread ------------------------------------------------------------------

    def close(self) -> None:
        """Stop the supervisor thread (a worker process never needs to; tests and tools do)."""
        self._closed.set()
        if self._thread is not None:
            self._thread.join(timeout=5 * self._tick + 5)

    def _run(self) -> None:
        pubsub = None
        next_renewal = time.monotonic() + self._renew_every
        while not self._closed.is_set():
            try:
                if pubsub is None:
                    pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
                    pubsub.subscribe(CONTROL_CHANNEL)
                message = pubsub.get_message(timeout=self._tick)
                if message is not None:
                    self._on_control(message["data"])
                self._check_revoked_and_deadlines()
                if time.monotonic() >= next_renewal:
                    next_renewal = time.monotonic() + self._renew_every
                    self._renew_leases()
            except redis.RedisError as exc:
                log.warning("turn supervisor lost Redis (%s); reconnecting", exc)
                if pubsub is not None:
                    pubsub.close()
                pubsub = None
                time.sleep(self._tick)
            except Exception:
                log.exception("turn supervisor tick failed")
                time.sleep(self._tick)
        if pubsub is not None:
            pubsub.close()

    def _on_control(self, raw: bytes | str) -> None:
        try:
            request = json.loads(raw)
            message_id, owner = request.get("stop"), request.get("owner")
        except (ValueError, AttributeError):
            log.warning("ignoring a malformed control message")
            return
        with self._guard:
            control = self._controls.get(message_id) if isinstance(message_id, str) else None
        if control is None:
            return
        if owner != control.owner:
            # Not logged with what the request said: it is anyone's text.
            log.warning("ignoring a stop of turn %s that did not come from its owner",
                        control.message_id)
            return
        self.interrupt(control, STOPPED)

    def _check_revoked_and_deadlines(self) -> None:
        revoked = _celery_revoked()
        now = time.monotonic()
        with self._guard:
            controls = list(self._controls.values())
        for control in controls:
            if control.stopped:
                continue
            if control.task_id in revoked:
                self.interrupt(control, STOPPED)
            elif now >= control.deadline_at:
                self.interrupt(control, DEADLINE)

    def _renew_leases(self) -> None:
        with self._guard:
            leases = [c.lease for c in self._controls.values() if c.lease is not None]
        lost = self._locks.renew(leases)
        if not lost:
            return
        # A turn that ended during the round trip released its lease: not a loss.
        with self._guard:
            holders = {c.lease: c for c in self._controls.values() if c.lease is not None}
        for lease in lost:
            control = holders.get(lease)
            if control is None:
                continue
            if self._locks.retake(lease):
                if control.lease is not lease:  # the turn ended meanwhile: give it back
                    self._locks.release(lease)
                    continue
                log.warning("conversation lease %s of turn %s lapsed while it ran (this "
                            "process was slow); nobody had taken it over, so it goes on",
                            lease.key, control.message_id)
            else:
                log.warning("turn %s was taken over by another worker (its lease %s is "
                            "another's now); stopping this copy", control.message_id,
                            lease.key)
                self.interrupt(control, TAKEN_OVER)


def _celery_revoked() -> Any:
    """Task ids revoked in this worker process (Flower's revoke lands here)."""
    from celery.worker import state

    return state.revoked
