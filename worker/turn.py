"""One chat turn, from a validated payload to a saved answer, readable top to bottom.

``run_turn`` is one attempt. It either finishes the turn (answer streamed, snapshot and message
saved in one transaction, ``message_end`` published) or raises an ``AgentBackendError`` and
leaves the snapshot untouched; the task decides whether another attempt follows.

The order of the last steps is deliberate: the answer is saved before ``message_end`` goes out,
so a client that sees the end can read the message back; and if publishing the end fails after
the save, the retry finds the message succeeded and only re-emits the end.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from config.settings import Settings
from worker.answer import answer_text
from worker.backend import AgentBackendClient, RunEvent
from worker.composition import CompositionTemplate, build_run_request, load_template
from worker.errors import (
    TRANSIENT_RUN_FAILURE_REASONS,
    AgentBackendError,
    BackendUnavailable,
    ConversationBusy,
    ProtocolViolation,
    RunCancelled,
    RunFailed,
    RunRejected,
    TransientRunFailure,
    TurnInterrupted,
    TurnTimedOut,
    status_for_code,
)
from worker.locks import ConversationLocks
from worker.payload import TurnPayload
from worker.progress import TurnProgress
from worker.publisher import EventBus, TurnIds, TurnPublisher
from worker.steps import AgentStep, StepExposure, StepTracker
from worker.store import (
    FINISHED_STATUSES,
    MessageState,
    MessageStatus,
    NewMessage,
    SessionStore,
    make_engine,
)
from worker.supervisor import DEADLINE, STOPPED, TurnControl, TurnSupervisor

log = logging.getLogger(__name__)

# Run states from which the run's stream can still deliver an answer worth re-attaching to.
REATTACHABLE_RUN_STATES = frozenset({"running", "succeeded"})


@dataclass
class TurnServices:
    """The long-lived clients a turn uses; built once per worker process and shared by threads."""

    settings: Settings
    template: CompositionTemplate
    store: SessionStore
    bus: EventBus
    backend: AgentBackendClient
    locks: ConversationLocks
    supervisor: TurnSupervisor

    @classmethod
    def from_settings(cls, settings: Settings) -> TurnServices:
        template = load_template(settings.composition_template)
        pool = redis.BlockingConnectionPool.from_url(
            settings.pubsub_url,
            max_connections=settings.worker_concurrency + 8,
            timeout=10,
            socket_timeout=10,
            socket_connect_timeout=5,
            health_check_interval=30,
            # A Redis restart or failover of a second or two costs a turn some latency, not an
            # attempt: commands are retried on a fresh connection with backoff (~3 s in all).
            retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=6),
            retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        )
        bus = EventBus.from_settings(redis.Redis(connection_pool=pool), settings)
        backend = AgentBackendClient(
            settings.backend_url,
            token=settings.backend_token.get_secret_value() if settings.backend_token else None,
            connect_timeout=settings.backend_connect_timeout,
            read_timeout=settings.backend_read_timeout,
            max_reconnects=settings.stream_max_reconnects,
            reconnect_delay=settings.stream_reconnect_delay,
            max_frame_bytes=settings.max_frame_bytes,
            pool_size=settings.worker_concurrency + 8,
        )
        store = SessionStore(make_engine(settings.database_url, pool_size=settings.db_pool_size))
        store.create_schema()
        locks = ConversationLocks(bus.redis, ttl_seconds=settings.conversation_lease_seconds)
        supervisor = TurnSupervisor(bus.redis, backend, locks,
                                    lease_ttl_seconds=settings.conversation_lease_seconds,
                                    tick_seconds=settings.supervisor_tick_seconds)
        return cls(settings=settings, template=template, store=store, bus=bus, backend=backend,
                   locks=locks, supervisor=supervisor)


_services: TurnServices | None = None
_services_lock = threading.Lock()


def get_services(settings: Settings) -> TurnServices:
    global _services
    with _services_lock:
        if _services is None:
            _services = TurnServices.from_settings(settings)
        return _services


@dataclass(frozen=True)
class TurnOutcome:
    message_id: str
    run_id: str | None
    answer: str
    usage: dict[str, Any] | None
    chunks: int
    status: str = MessageStatus.SUCCEEDED.value
    replayed: bool = False

    def summary(self) -> dict[str, Any]:
        """What the Celery result (and so Flower) shows: ids and sizes, not the answer."""
        return {"status": self.status, "message_id": self.message_id, "run_id": self.run_id,
                "answer_chars": len(self.answer), "chunks": self.chunks,
                "replayed": self.replayed}


def run_turn(turn: TurnPayload, *, task_id: str, services: TurnServices,
             progress: TurnProgress | None = None) -> TurnOutcome:
    """One attempt at a turn, holding its conversation's lease while it runs.

    Raises ``ConversationBusy`` (after recording the turn as queued) while another turn of the
    conversation runs; the task then waits and tries again without spending a retry. Raises
    ``NotTheOwner``, having read and written nothing of theirs, when the conversation or the
    message id belongs to another (tenant, app, user).
    """
    new = _new_message(turn, task_id)
    ids = TurnIds(task_id, turn.message_id, turn.conversation_id)
    publisher = services.bus.turn(ids)
    progress = progress or TurnProgress(ids)
    # Before anything else is read or written: a turn naming another owner's conversation or
    # message raises NotTheOwner here, and the task refuses it on a stream of its own.
    services.store.claim(new)
    services.bus.record_owner(turn.message_id, turn.owner)
    control = services.supervisor.register(
        task_id, turn.message_id, deadline_seconds=services.settings.turn_deadline_seconds)
    try:
        if services.supervisor.stop_requested(turn.message_id):
            log.info("turn %s was stopped before it ran", turn.message_id)
            return _end_stopped(new, publisher, services, progress, partial_answer="",
                                run_id=None)
        lease = services.locks.acquire(turn.conversation_id, turn.message_id)
        if lease is None:
            queued = services.store.mark_queued(new)
            progress.queued()
            raise ConversationBusy(
                f"conversation {turn.conversation_id} has a turn running",
                message_id=turn.message_id,
            ).waiting_since(queued.created_at)
        control.lease = lease
        try:
            return _attempt(turn, new, publisher, control, services, progress)
        finally:
            services.locks.release(lease)
    finally:
        services.supervisor.unregister(control)


def end_stopped_before_running(turn: TurnPayload, *, task_id: str,
                               services: TurnServices) -> TurnOutcome | None:
    """End a turn that was stopped before any attempt ran (a revoked task).

    Raises ``NotTheOwner`` (nothing written) for a turn naming another owner's conversation or
    message, as ``run_turn`` does.

    A turn that has ended already is left alone (None): its end went out, and a second one
    would contradict it (a finished turn's task redelivered, then revoked).
    """
    services.store.claim(_new_message(turn, task_id))
    message = services.store.get_message(turn.message_id)
    if message is not None and message.status in FINISHED_STATUSES:
        log.info("revoked turn %s had already ended (%s)", turn.message_id, message.status)
        return None
    services.bus.record_owner(turn.message_id, turn.owner)
    ids = TurnIds(task_id, turn.message_id, turn.conversation_id)
    return _end_stopped(_new_message(turn, task_id), services.bus.turn(ids), services,
                        TurnProgress(ids), partial_answer="", run_id=None)


def _new_message(turn: TurnPayload, task_id: str) -> NewMessage:
    return NewMessage(
        message_id=turn.message_id, conversation_id=turn.conversation_id,
        tenant_id=turn.tenant_id, app_id=turn.app_id, user_id=turn.user_id, task_id=task_id,
        query=turn.query,
    )


def _attempt(turn: TurnPayload, new: NewMessage, publisher: TurnPublisher,
             control: TurnControl, services: TurnServices,
             progress: TurnProgress) -> TurnOutcome:
    state = services.store.begin_attempt(new)
    if state.status in FINISHED_STATUSES:
        return _re_emit_end(turn, state, publisher)
    progress.attempt_started(state.attempts)
    streamed = StreamedAnswer()
    steps = StepTracker(turn.message_id, _exposure(turn, services.settings))
    try:
        shown = services.bus.client_text(turn.message_id)
        creating = time.monotonic()
        run_id, base_version = _start_or_reattach(turn, state, services)
        reattached = run_id == state.run_id
        steps.restart(run_id)
        progress.run_started(run_id, reattached=reattached,
                             seconds=time.monotonic() - creating)
        # What an earlier attempt streamed stays on the client's screen. The same run replays
        # the same text, so the client only needs the rest; a new run may answer otherwise, so
        # the client is told to start again.
        skip_chars = 0
        if shown.published and reattached and shown.resumable:
            skip_chars = shown.chars
        elif shown.published:
            publisher.replace("")
        control.run_id = run_id
        if control.stopped:
            services.supervisor.cancel_run_soon(control)
        terminal = _relay_answer(run_id, turn.message_id, publisher, services, control,
                                 streamed, progress, steps, skip_chars)
        output, snapshot, usage = _successful_result(terminal, run_id, turn.message_id)
        answer = answer_text(output)
        if len(answer) > services.settings.max_answer_chars:
            raise ProtocolViolation(
                f"the answer exceeds {services.settings.max_answer_chars} characters",
                run_id=run_id, message_id=turn.message_id)
    except AgentBackendError as exc:
        exc.attempts = state.attempts
        if control.stop_reason == STOPPED:
            return _end_stopped(new, publisher, services, progress,
                                partial_answer=streamed.text(), run_id=control.run_id,
                                steps=steps.steps())
        publisher.discard()
        _keep_steps(services, turn.message_id, steps)
        if control.stop_reason == DEADLINE:
            raise TurnTimedOut(
                f"the turn passed its {services.settings.turn_deadline_seconds:g}s deadline",
                run_id=control.run_id, message_id=turn.message_id,
            ).counting(state.attempts) from None
        raise

    if answer != streamed.text():
        publisher.replace(answer)
    services.store.save_success(
        message_id=turn.message_id, conversation_id=turn.conversation_id,
        tenant_id=turn.tenant_id, app_id=turn.app_id, expected_version=base_version,
        snapshot=snapshot, layer_names=services.template.layer_names, answer=answer,
        usage=usage, run_id=run_id, steps=steps.steps(),
    )
    publisher.end(answer, {"usage": usage})
    progress.ended(MessageStatus.SUCCEEDED, chunks=publisher.chunks_published,
                   chars=len(answer))
    return TurnOutcome(turn.message_id, run_id, answer, usage, publisher.chunks_published)


def _re_emit_end(turn: TurnPayload, state: MessageState,
                 publisher: TurnPublisher) -> TurnOutcome:
    """A redelivered finished turn: tell a waiting client how it ended, touch nothing else."""
    log.info("turn %s already %s; re-emitting its end", turn.message_id, state.status)
    answer = state.answer or ""
    if state.status == MessageStatus.FAILED:
        code = state.error_code or AgentBackendError.code
        publisher.error(status=status_for_code(code), code=code, message=state.error or "")
    else:
        publisher.end(answer, {"usage": state.usage}, status=state.status)
    return TurnOutcome(turn.message_id, state.run_id, answer, state.usage, 0,
                       status=state.status, replayed=True)


def _end_stopped(new: NewMessage, publisher: TurnPublisher, services: TurnServices,
                 progress: TurnProgress, *, partial_answer: str,
                 run_id: str | None, steps: Sequence[AgentStep] = ()) -> TurnOutcome:
    """End a stopped turn: what was streamed stays the answer; no snapshot is saved.

    The backend's snapshot of a cancelled run is not sent back, so the next turn continues from
    the last completed one; the partial answer is kept on the message for the user to see.
    """
    final = services.store.mark_stopped(new, partial_answer=partial_answer, steps=steps)
    answer = final.answer or ""
    publisher.end(answer, {"usage": None}, status=MessageStatus.STOPPED)
    progress.ended(MessageStatus.STOPPED, chunks=publisher.chunks_published, chars=len(answer))
    return TurnOutcome(new.message_id, run_id, answer, None, publisher.chunks_published,
                       status=MessageStatus.STOPPED.value)


def _exposure(turn: TurnPayload, settings: Settings) -> StepExposure:
    """What of the agent's process this turn shows: the payload's choice, else the settings'."""
    chosen = turn.agent
    return StepExposure(
        thinking=settings.expose_thinking if chosen.include_thinking is None
        else chosen.include_thinking,
        tool_calls=settings.expose_tool_calls if chosen.include_tool_calls is None
        else chosen.include_tool_calls,
        max_steps=settings.max_steps_per_message,
        max_field_chars=settings.max_step_field_chars,
    )


def _keep_steps(services: TurnServices, message_id: str, steps: StepTracker) -> None:
    """A failing attempt keeps the steps its client saw; a lost save costs only the record."""
    if not steps.steps():
        return
    try:
        services.store.save_steps(message_id, steps.steps())
    except AgentBackendError as exc:
        log.warning("could not keep the steps of turn %s: %s", message_id, exc)


class StreamedAnswer:
    """The answer text streamed so far, kept as parts and joined only when needed."""

    def __init__(self) -> None:
        self._parts: list[str] = []
        self.chars = 0

    def append(self, delta: str) -> None:
        self._parts.append(delta)
        self.chars += len(delta)

    def text(self) -> str:
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""


def _start_or_reattach(
    turn: TurnPayload, state: MessageState, services: TurnServices
) -> tuple[str, int]:
    """The run this attempt follows, and the snapshot version it was built on.

    A run recorded by an earlier attempt that is still running (or already has the answer) is
    followed again from its first event rather than paid for twice. Otherwise a new run starts
    from the current snapshot, under the next run number's idempotency key.
    """
    if state.run_id is not None and state.base_version is not None:
        try:
            status = services.backend.get_run(state.run_id).get("status")
        except RunRejected:
            status = None
        if status in REATTACHABLE_RUN_STATES:
            log.info("turn %s re-attaching to run %s (%s)", turn.message_id, state.run_id, status)
            return state.run_id, state.base_version

    loaded = services.store.load_snapshot(turn.conversation_id, services.template.layer_names)
    run_number = state.run_count + 1
    body = build_run_request(turn, services.template, services.settings,
                             session_snapshot=loaded.snapshot, run_number=run_number)
    run_id = services.backend.create_run(body, message_id=turn.message_id)
    services.store.record_run(turn.message_id, run_id=run_id, run_count=run_number,
                              base_version=loaded.version)
    return run_id, loaded.version


def _relay_answer(
    run_id: str, message_id: str, publisher: TurnPublisher, services: TurnServices,
    control: TurnControl, streamed: StreamedAnswer, progress: TurnProgress,
    steps: StepTracker, skip_chars: int = 0,
) -> RunEvent:
    """Publish the run's answer deltas and steps as they come; return the terminal event.

    The first ``skip_chars`` characters are counted but not published: the client has them
    from an earlier attempt at the same run.
    """
    limit = services.settings.max_answer_chars
    events = services.backend.stream_events(run_id, message_id=message_id, watcher=control)
    for event in events:
        if control.stopped:
            raise TurnInterrupted("the turn was interrupted", run_id=run_id,
                                  message_id=message_id)
        if event.terminal:
            publisher.flush()
            return event
        step = steps.feed(event)
        if step is not None:
            publisher.step(step.event_fields())
        if event.answer_delta:
            if streamed.chars + len(event.answer_delta) > limit:
                raise ProtocolViolation(f"the streamed answer exceeds {limit} characters",
                                        run_id=run_id, message_id=message_id)
            streamed.append(event.answer_delta)
            fresh = event.answer_delta
            if skip_chars:
                fresh, skip_chars = fresh[skip_chars:], max(0, skip_chars - len(fresh))
            if fresh:
                publisher.delta(fresh)
                progress.chunk(publisher.chunks_published, streamed.chars)
    raise BackendUnavailable("the event stream ended without a terminal event",
                             run_id=run_id, message_id=message_id)


def _successful_result(
    terminal: RunEvent, run_id: str, message_id: str
) -> tuple[Any, dict[str, Any] | None, dict[str, Any] | None]:
    """``output``, ``session_snapshot`` and ``usage`` of a succeeded run; raise for the others."""
    data = terminal.data
    ids = {"run_id": run_id, "message_id": message_id}
    if terminal.type == "run_failed":
        reason = data.get("reason")
        message = f"the run failed: {data.get('error')}" + (f" ({reason})" if reason else "")
        if reason in TRANSIENT_RUN_FAILURE_REASONS:
            raise TransientRunFailure(message, reason=reason, **ids)
        raise RunFailed(message, reason=reason, **ids)
    if terminal.type == "run_cancelled":
        raise RunCancelled(f"the backend cancelled the run ({data.get('reason')})", **ids)
    if "output" not in data:
        raise RunFailed("the run asked for a deferred tool call, which chat turns do not serve",
                        **ids)
    return data.get("output"), data.get("session_snapshot"), data.get("usage")

