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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
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
    ConversationAwaitingInput,
    ConversationBusy,
    EventBusUnavailable,
    ProtocolViolation,
    RunCancelled,
    RunFailed,
    RunRejected,
    TransientRunFailure,
    TurnInterrupted,
    TurnTakenOver,
    TurnTimedOut,
    status_for_code,
)
from worker.locks import ConversationLocks, Lease
from worker.payload import HumanInputRequest, TurnPayload
from worker.progress import TurnProgress
from worker.publisher import (
    NOTHING_SHOWN,
    TERMINAL_EVENTS,
    EventBus,
    TurnIds,
    TurnPublisher,
)
from worker.questions import (
    ASK_HUMAN_TOOL,
    HumanAnswer,
    PendingQuestion,
    check_answer,
    question_from_call,
)
from worker.steps import AgentStep, StepExposure, StepTracker
from worker.store import (
    FINISHED_STATUSES,
    MessageState,
    MessageStatus,
    NewMessage,
    SessionStore,
    make_engine,
)
from worker.supervisor import DEADLINE, STOPPED, TAKEN_OVER, TurnControl, TurnSupervisor
from worker.takeover import this_worker

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
        locks = ConversationLocks(bus.redis, ttl_seconds=settings.conversation_lease_seconds,
                                  worker=this_worker())
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
    # A question waiting for the user's answer holds its conversation: a turn sent meanwhile
    # would start from a snapshot the answer's continuation is about to replace.
    waiting = services.store.claim(new)
    if waiting is not None:
        services.bus.record_owner(turn.message_id, turn.owner)
        raise ConversationAwaitingInput(
            f"conversation {turn.conversation_id} waits for the answer to the question of "
            f"message {waiting}", message_id=turn.message_id)
    control = services.supervisor.register(
        task_id, turn.message_id, owner=turn.owner,
        deadline_seconds=services.settings.turn_deadline_seconds)
    try:
        stop_requested, lease = _start(turn, services)
        if stop_requested:
            if lease is not None:
                services.locks.release(lease)
            ended = services.store.get_message(turn.message_id)
            if ended is not None and ended.status in FINISHED_STATUSES:
                # Delivered again after its end, with its stop flag still set: its end stands.
                return _re_emit_end(turn, ended, publisher, services)
            log.info("turn %s was stopped before it ran", turn.message_id)
            return _end_stopped(new, publisher, services, progress, partial_answer="",
                                run_id=None)
        if lease is None:
            _wait_for_own_copy(turn, services)
            queued = services.store.mark_queued(new)
            progress.queued()
            raise ConversationBusy(
                f"conversation {turn.conversation_id} has a turn running",
                message_id=turn.message_id,
            ).waiting_since(queued.created_at)
        return _holding(lease, control, publisher, services,
                        lambda: _attempt(turn, new, publisher, control, services, progress))
    finally:
        services.supervisor.unregister(control)


def _start(turn: TurnPayload, services: TurnServices) -> tuple[bool, Lease | None]:
    """Record the turn's owner, read whether its owner asked to stop it, and try its
    conversation's lease: whether to stop, and the lease (None: another turn holds it).

    One round trip, where it used to be three, each of which waited for its turn of a busy
    worker's hub while a burst of turns started (docs/performance.md). The owner is recorded
    before anything is published, as the gateway needs; a turn that is to stop gives back the
    lease it may have taken with the others.
    """
    with services.bus.redis.pipeline(transaction=False) as pipe:
        recorded = services.bus.record_owner_on(pipe, turn.message_id, turn.owner)
        stop_requested = services.supervisor.stop_requested_on(pipe, turn.message_id,
                                                                turn.owner)
        took = services.locks.acquire_on(pipe, turn.conversation_id, turn.message_id)
        try:
            owner_reply, stop_reply, lease_reply = pipe.execute(raise_on_error=False)
        except redis.RedisError as exc:
            raise EventBusUnavailable(f"starting the turn on Redis failed: {exc}",
                                      message_id=turn.message_id) from exc
    lease = took(lease_reply)
    try:
        recorded(owner_reply)
        return stop_requested(stop_reply), lease
    except AgentBackendError:
        if lease is not None:
            services.locks.release(lease)
        raise


def _wait_for_own_copy(turn: TurnPayload, services: TurnServices) -> None:
    """A delivery of a message whose own turn holds the lease is a second copy of it: the
    original message, redelivered while a worker that took the turn over runs it (or the other
    way round). It waits, without a time limit and without showing as queued, for that copy to
    end or to die; then it finds the turn ended (and publishes nothing) or takes it over."""
    if services.locks.holding_message(turn.conversation_id) == turn.message_id:
        raise ConversationBusy(f"turn {turn.message_id} runs elsewhere; this copy waits",
                               message_id=turn.message_id)


def _holding(lease: Lease, control: TurnControl, publisher: TurnPublisher,
             services: TurnServices, attempt: Callable[[], TurnOutcome]) -> TurnOutcome:
    """Run ``attempt`` holding the conversation's lease, which also fences its events."""
    control.lease = publisher.fence = lease
    try:
        return attempt()
    finally:
        control.lease = None  # before the release: the supervisor must not take it again
        services.locks.release(lease)


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
    state = services.store.begin_attempt(new, services.template.layer_names)
    if state.status in FINISHED_STATUSES:
        return _re_emit_end(turn, state, publisher, services)
    if state.status == MessageStatus.AWAITING_INPUT:
        return _re_emit_question(turn, state, publisher)
    progress.attempt_started(state.attempts)
    streamed = StreamedAnswer()
    steps = StepTracker(turn.message_id, _exposure(turn, services.settings))
    try:
        # A first attempt has nothing on the client's screen: publishing starts after
        # ``begin_attempt`` has counted it, and every later delivery (a retry, a takeover, a
        # continuation) counts one more.
        shown = (services.bus.client_text(turn.message_id) if state.attempts > 1
                 else NOTHING_SHOWN)
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
        result = _follow_run(run_id, turn, publisher, services, control, streamed, progress,
                             steps, skip_chars)
    except AgentBackendError as exc:
        _stop_if_taken_over(exc, control, publisher)
        exc.attempts = state.attempts
        stopped = _after_failure(new, publisher, control, services, progress, streamed, steps,
                                 attempts=state.attempts)
        if stopped is not None:
            return stopped
        raise

    return _end_leg(turn, publisher, services, progress, result, run_id=run_id,
                    base_version=base_version, streamed=streamed, steps=steps)


@dataclass(frozen=True, slots=True)
class RunResult:
    """How a followed run ended: a question to the user, or an answer (with its snapshot)."""

    terminal: RunEvent
    question: PendingQuestion | None = None
    answer: str = ""
    snapshot: dict[str, Any] | None = None
    usage: dict[str, Any] | None = None


def _follow_run(run_id: str, turn: TurnPayload, publisher: TurnPublisher,
                services: TurnServices, control: TurnControl, streamed: StreamedAnswer,
                progress: TurnProgress, steps: StepTracker, skip_chars: int) -> RunResult:
    """Relay a run to its terminal event and read how it ended; raise for a failed run."""
    control.run_id = run_id
    if control.stopped:
        services.supervisor.cancel_run_soon(control)
    terminal = _relay_answer(run_id, turn.message_id, publisher, services, control,
                             streamed, progress, steps, skip_chars)
    question = _question_of(terminal, run_id, turn.message_id)
    if question is not None:
        return RunResult(terminal, question)
    output, snapshot, usage = _successful_result(terminal, run_id, turn.message_id)
    return RunResult(terminal, answer=_checked_answer(output, services.settings, run_id,
                                                      turn.message_id),
                     snapshot=snapshot, usage=usage)


def _stop_if_taken_over(exc: AgentBackendError, control: TurnControl,
                        publisher: TurnPublisher) -> None:
    """A copy whose turn another worker took over ends here, writing and publishing nothing."""
    if isinstance(exc, TurnTakenOver) or control.stop_reason == TAKEN_OVER:
        publisher.discard()
        raise TurnTakenOver("another worker took the turn over; this copy stops",
                            run_id=control.run_id, message_id=control.message_id) from None


def _end_leg(turn: TurnPayload, publisher: TurnPublisher, services: TurnServices,
             progress: TurnProgress, result: RunResult, *, run_id: str, base_version: int,
             streamed: StreamedAnswer, steps: StepTracker) -> TurnOutcome:
    # The last writes of a copy that was paused past its lease must not land: the worker that
    # took the turn over makes them. (The snapshot's version check fences the snapshot even
    # in the moment between this check and the save.)
    if publisher.fence is not None and not services.locks.holds(publisher.fence):
        publisher.discard()
        raise TurnTakenOver("another worker took the turn over; this copy stops",
                            run_id=run_id, message_id=turn.message_id)
    if result.question is not None:
        return _ask(turn, publisher, services, progress, result.question,
                    terminal=result.terminal, run_id=run_id, base_version=base_version,
                    streamed=streamed, steps=steps)
    return _succeed(turn, publisher, services, progress, answer=result.answer,
                    snapshot=result.snapshot, usage=result.usage, run_id=run_id,
                    base_version=base_version, streamed=streamed, steps=steps)


def _after_failure(new: NewMessage, publisher: TurnPublisher, control: TurnControl,
                   services: TurnServices, progress: TurnProgress, streamed: StreamedAnswer,
                   steps: StepTracker, *, attempts: int | None) -> TurnOutcome | None:
    """What a failed attempt becomes: the stopped end of a turn stopped by its user, a
    ``TurnTimedOut`` past the deadline, or (None) the failure itself, which the caller raises.
    Text not yet out is dropped and the steps shown are kept either way."""
    if control.stop_reason == STOPPED:
        return _end_stopped(new, publisher, services, progress, partial_answer=streamed.text(),
                            run_id=control.run_id, steps=steps.steps())
    publisher.discard()
    _keep_steps(services, new.message_id, steps)
    if control.stop_reason == DEADLINE:
        timed_out = TurnTimedOut(
            f"the turn passed its {services.settings.turn_deadline_seconds:g}s deadline",
            run_id=control.run_id, message_id=new.message_id)
        raise (timed_out.counting(attempts) if attempts is not None else timed_out) from None
    return None


def _checked_answer(output: Any, settings: Settings, run_id: str, message_id: str) -> str:
    answer = answer_text(output)
    if len(answer) > settings.max_answer_chars:
        raise ProtocolViolation(f"the answer exceeds {settings.max_answer_chars} characters",
                                run_id=run_id, message_id=message_id)
    return answer


def _succeed(turn: TurnPayload, publisher: TurnPublisher, services: TurnServices,
             progress: TurnProgress, *, answer: str, snapshot: dict[str, Any] | None,
             usage: dict[str, Any] | None, run_id: str, base_version: int,
             streamed: StreamedAnswer, steps: StepTracker) -> TurnOutcome:
    """Save the answer (snapshot, message and steps together), then tell the client."""
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


def _question_of(terminal: RunEvent, run_id: str, message_id: str) -> PendingQuestion | None:
    """The question a succeeded run asks instead of answering, if it does."""
    data = terminal.data
    if terminal.type != "run_succeeded" or "output" in data or "deferred_tool_call" not in data:
        return None
    question = question_from_call(data["deferred_tool_call"], run_id=run_id,
                                  message_id=message_id)
    if question.tool_name != ASK_HUMAN_TOOL:
        raise RunFailed(f"the run asked for a deferred call of {question.tool_name!r}, which "
                        "chat turns do not serve", run_id=run_id, message_id=message_id)
    return question


def _ask(turn: TurnPayload, publisher: TurnPublisher, services: TurnServices,
         progress: TurnProgress, question: PendingQuestion, *, terminal: RunEvent,
         run_id: str, base_version: int, streamed: StreamedAnswer,
         steps: StepTracker) -> TurnOutcome:
    """End this leg with the question: save what resuming takes, then tell the client.

    The worker slot and the conversation lease are freed when this returns; the message
    waits (``awaiting_input``) until an answer's continuation or the expiry ends it.
    """
    settings = services.settings
    expires_at = datetime.now(UTC) + timedelta(seconds=settings.human_input_ttl_seconds)
    pending = {"question": question.as_json(),
               "snapshot": terminal.data.get("session_snapshot"),
               "base_version": base_version, "turn": turn.model_dump(mode="json"),
               "leg_run_id": run_id, "streamed": streamed.text()}
    services.store.mark_awaiting_input(turn.message_id, pending=pending,
                                       partial_answer=streamed.text(), steps=steps.steps(),
                                       expires_at=expires_at)
    services.bus.record_question(
        turn.message_id, question.record(expires_at, tenant_id=turn.tenant_id,
                                         app_id=turn.app_id, user_id=turn.user_id),
        ttl_seconds=int(settings.human_input_ttl_seconds) + 60)
    publisher.event("human_input_required", question.event_fields(expires_at))
    progress.ended(MessageStatus.AWAITING_INPUT, chunks=publisher.chunks_published,
                   chars=streamed.chars)
    return TurnOutcome(turn.message_id, run_id, streamed.text(), None,
                       publisher.chunks_published, status=MessageStatus.AWAITING_INPUT.value)


def _re_emit_question(turn: TurnPayload, state: MessageState,
                      publisher: TurnPublisher) -> TurnOutcome:
    """A redelivered turn that asked already: say the question again (a client keys it by
    its ``tool_call_id``), start nothing."""
    pending = state.pending_input or {}
    question = PendingQuestion.from_json(pending["question"])
    expires_at = state.input_expires_at or datetime.now(UTC)
    if expires_at.tzinfo is None:
        expires_at = expires_at.replace(tzinfo=UTC)
    publisher.event("human_input_required", question.event_fields(expires_at))
    return TurnOutcome(turn.message_id, state.run_id, state.answer or "", None, 0,
                       status=MessageStatus.AWAITING_INPUT.value, replayed=True)


def resume_turn(answer: HumanInputRequest, *, task_id: str, services: TurnServices,
                progress: TurnProgress) -> TurnOutcome:
    """The continuation of a message after the user answered its question.

    The answer is taken exactly once (``SessionStore.take_answer``: a second answer, or one
    to a question that is closed, is refused); then a new run starts from the question's
    snapshot with ``deferred_tool_results`` and streams on the same message: the same channel,
    seqs going on, one ``message_end`` for the whole message. A continuation redelivered after
    a crash re-attaches to the run it had started.
    """
    settings = services.settings

    def accept(pending: dict[str, Any]) -> dict[str, Any]:
        return check_answer(PendingQuestion.from_json(pending["question"]),
                            tool_call_id=answer.tool_call_id, action=answer.action,
                            values=answer.values, max_bytes=settings.max_human_input_bytes,
                            message_id=answer.message_id).as_json()

    pending = services.store.take_answer(
        answer.message_id, owner=(answer.tenant_id, answer.app_id, answer.user_id),
        task_id=task_id, accept=accept)
    turn = TurnPayload.model_validate(pending["turn"], context={"settings": settings})
    services.bus.forget_question(turn.message_id)
    ids = TurnIds(task_id, turn.message_id, turn.conversation_id)
    publisher = services.bus.turn(ids)
    control = services.supervisor.register(task_id, turn.message_id, owner=turn.owner,
                                           deadline_seconds=settings.turn_deadline_seconds)
    try:
        lease = services.locks.acquire(turn.conversation_id, turn.message_id)
        if lease is None:
            raise ConversationBusy(f"conversation {turn.conversation_id} has a turn running",
                                   message_id=turn.message_id)
        return _holding(lease, control, publisher, services,
                        lambda: _continue(turn, pending, publisher, control, services,
                                          progress))
    finally:
        services.supervisor.unregister(control)


def _continue(turn: TurnPayload, pending: dict[str, Any], publisher: TurnPublisher,
              control: TurnControl, services: TurnServices,
              progress: TurnProgress) -> TurnOutcome:
    new = _new_message(turn, publisher.ids.task_id)
    human = HumanAnswer.from_json(pending["answer"])
    base_version = int(pending["base_version"])
    streamed = StreamedAnswer()
    streamed.append(pending.get("streamed") or "")
    steps = StepTracker(turn.message_id, _exposure(turn, services.settings))
    shown = [AgentStep(row.step_id, row.position, row.thought, row.tool, row.tool_input,
                       row.observation) for row in services.store.list_steps(turn.message_id)]
    try:
        state = services.store.get_message(turn.message_id)
        run_id: str | None = None
        if state is not None and state.run_id and state.run_id != pending["leg_run_id"]:
            try:
                status = services.backend.get_run(state.run_id).get("status")
            except RunRejected:
                status = None
            if status in REATTACHABLE_RUN_STATES:
                run_id = state.run_id
        skip_chars = 0
        if run_id is not None:
            client = services.bus.client_text(turn.message_id)
            skip_chars = max(0, client.chars - streamed.chars) if client.resumable else 0
        else:
            run_number = (state.run_count if state is not None else 0) + 1
            body = build_run_request(turn, services.template, services.settings,
                                     session_snapshot=pending.get("snapshot"),
                                     run_number=run_number,
                                     deferred_tool_results=human.deferred_tool_results())
            run_id = services.backend.create_run(body, message_id=turn.message_id)
            services.store.record_run(turn.message_id, run_id=run_id, run_count=run_number,
                                      base_version=base_version)
        steps.resume(shown, tool_call_id=human.tool_call_id, run_key=run_id)
        progress.run_started(run_id, reattached=skip_chars > 0, seconds=0.0)
        result = _follow_run(run_id, turn, publisher, services, control, streamed, progress,
                             steps, skip_chars)
    except AgentBackendError as exc:
        _stop_if_taken_over(exc, control, publisher)
        stopped = _after_failure(new, publisher, control, services, progress, streamed, steps,
                                 attempts=None)
        if stopped is not None:
            return stopped
        raise
    return _end_leg(turn, publisher, services, progress, result, run_id=run_id,
                    base_version=base_version, streamed=streamed, steps=steps)


def _re_emit_end(turn: TurnPayload, state: MessageState, publisher: TurnPublisher,
                 services: TurnServices) -> TurnOutcome:
    """A redelivered finished turn: if its end is not on its replay log (publishing it failed
    after the save), tell a waiting client how it ended; touch nothing else either way."""
    answer = state.answer or ""
    if services.bus.last_event(turn.message_id) in TERMINAL_EVENTS:
        log.info("turn %s already %s, its end on the log; this delivery publishes nothing",
                 turn.message_id, state.status)
        return TurnOutcome(turn.message_id, state.run_id, answer, state.usage, 0,
                           status=state.status, replayed=True)
    log.info("turn %s already %s; re-emitting its end", turn.message_id, state.status)
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

    loaded = state.snapshot or services.store.load_snapshot(turn.conversation_id,
                                                            services.template.layer_names)
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
        raise ProtocolViolation("the run succeeded with neither output nor a question", **ids)
    return data.get("output"), data.get("session_snapshot"), data.get("usage")

