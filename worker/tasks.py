"""The Celery entry point of a turn: validate, run one attempt, then retry or end it for good.

Every way a turn can end leaves the client with exactly one ``message_end`` or ``error`` event:
``run_turn`` publishes the end of a success; this module publishes the ``error`` of a turn that
fails for good (an invalid payload, a permanent error, or the last retry spent).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import random
import threading
import time
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, NoReturn

import redis
from celery import Task
from celery.concurrency.prefork import TaskPool as PreforkPool
from celery.exceptions import Ignore, Reject
from celery.signals import task_revoked, worker_init, worker_ready, worker_shutdown
from celery.worker.request import Request
from celery.worker.state import revoked as revoked_tasks

from config.celery import (
    RESUME_TASK_NAME,
    TURN_ARGSREPR,
    TURN_TASK_NAME,
    is_redis_url,
    turn_kwargsrepr,
)
from config.settings import Settings, get_settings
from worker import metrics
from worker.app import app, task_event_dispatcher
from worker.composition import CompositionTemplateError, load_template
from worker.errors import (
    AgentBackendError,
    ConversationBusy,
    HumanInputExpired,
    HumanInputRefused,
    InvalidTurnPayload,
    NotTheOwner,
    TurnTakenOver,
)
from worker.logs import excerpt, log_stage
from worker.ownership import owner_fingerprint, refusal_stream
from worker.payload import (
    TurnPayload,
    parse_human_input,
    parse_turn,
    valid_identifier,
    valid_message_id,
)
from worker.progress import ProgressReporter, TurnProgress, store_progress
from worker.publisher import EventBus, TurnIds
from worker.takeover import (
    Delivery,
    DeliveryRegistry,
    TakeoverWatcher,
    broker_id,
    name_this_worker,
    this_worker,
)
from worker.turn import (
    TurnServices,
    end_stopped_before_running,
    get_services,
    resume_turn,
    run_turn,
)

log = logging.getLogger(__name__)


STREAMING = "STREAMING"


@worker_init.connect
def _serve_metrics(**_: Any) -> None:
    settings = get_settings()
    metrics.serve(settings.metrics_port, settings.metrics_host)


@worker_init.connect
def _check_composition_template(**_: Any) -> None:
    """Refuse to start with a broken template rather than fail every turn.

    Celery logs and swallows an ``Exception`` raised by a signal handler, so the refusal is a
    ``SystemExit``, which it lets through.
    """
    try:
        load_template(get_settings().composition_template)
    except CompositionTemplateError as exc:
        log.critical("%s", exc)
        raise SystemExit(f"agent-turn worker not started: {exc}") from None


# First-generation threshold once start-up objects are frozen (CPython's default is 700).
GC_THRESHOLD = 50_000


@worker_ready.connect
def _freeze_start_up_objects(**_: Any) -> None:
    """Keep the garbage collector off the objects start-up made.

    Celery, kombu, SQLAlchemy and pydantic leave a few hundred thousand long-lived objects,
    and every full collection walks all of them while every turn of the process waits: those
    pauses were the worker's tail latency. Frozen objects are never collected (they live as
    long as the process anyway), and a larger first threshold makes collections rarer; what
    turns allocate is mostly freed by reference counting.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, *gc.get_threshold()[1:])


def retry_delay(retries_done: int, settings: Settings) -> float:
    """Exponential backoff with "equal" jitter: half the step fixed, half random.

    The jitter spreads a burst of failed turns over time; the fixed half keeps the total wait
    growing, so the retries outlast a short outage (full jitter can spend them all at once).
    """
    ceiling = min(settings.retry_backoff_max, settings.retry_backoff_base * 2**retries_done)
    return ceiling / 2 + random.uniform(0, ceiling / 2)


class TurnRequest(Request):
    """A turn's Celery request: a running turn is stopped, never killed.

    Revoke with terminate (Flower's "terminate") would kill a gevent pool's greenlet wherever
    it was, and Celery revokes (a Redis round trip) before it kills. In between, the supervisor
    finds the task in the revoked set and the turn starts to end as stopped; the kill then
    lands in its ending, after the answer was saved but before ``message_end`` went out, or in
    Celery's bookkeeping after it, which then reports the task succeeded with no result. The
    revoked set alone already stops the turn within the supervisor's tick, so a running turn
    ends the same way on every pool, with one end event.

    Every turn request is also listed in its worker's deliveries from the moment it is built
    (the write goes out with the registry's next round trip, and the turn waits for it before
    it starts) until its message is acknowledged or rejected, so that a live worker can hand
    it on at once if this one dies (worker/takeover.py).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._held_tag: str | None = None
        writes = [_unacked_record_write(self.message)]
        if _deliveries is not None:
            delivery = _delivery_of(self)
            if delivery is not None:
                writes.append(_deliveries.hold_soon(delivery))
                self._held_tag = delivery.tag
        outstanding = [write for write in writes if write is not None]
        if outstanding:
            _receipt_writes[self.id] = outstanding

    def execute_using_pool(self, pool: Any, **kwargs: Any) -> Any:
        """A pool of child processes (prefork) runs the turn where this process's writes
        cannot be waited for: the wait for the receipt happens here, before the hand-off."""
        if isinstance(pool, PreforkPool):
            _wait_until_listed(self.id)
        return super().execute_using_pool(pool, **kwargs)

    def terminate(self, pool: Any, signal: Any = None) -> None:
        if self.time_start:
            log.info("terminate of running task %s: the supervisor stops it as a revoke",
                     self.id)
            return
        super().terminate(pool, signal)

    def on_retry(self, exc_info: Any) -> None:
        """Send ``task-retried``, then ``task-revoked`` again if a revoke landed meanwhile.

        A revoke that lands while an attempt runs (a waiting turn checks its conversation every
        half second) races Celery's retry: the retry's new message is published first, and the
        worker discards it as revoked (``task-revoked``, the turn ends as stopped) before this
        attempt's ``task-retried`` goes out. Flower and the result backend take the last word,
        so the task would show RETRY for good (celery/celery#6793 is the same race). Saying
        REVOKED again after the retry makes the last word the true one, whichever came first.
        """
        super().on_retry(exc_info)
        if self.id in revoked_tasks:
            self.send_event("task-revoked", terminated=False, signum=None, expired=False)
            self.task.backend.mark_as_revoked(self.id, "revoked", request=self._context,
                                              store_result=self.store_errors)

    def acknowledge(self) -> None:
        super().acknowledge()
        self._forget()

    def reject(self, requeue: bool = False) -> None:
        super().reject(requeue=requeue)
        self._forget()

    def _forget(self) -> None:
        _receipt_writes.pop(self.id, None)
        if self._held_tag is not None and _deliveries is not None:
            _deliveries.forget_soon(self._held_tag)
            self._held_tag = None


_deliveries: DeliveryRegistry | None = None
# Task id -> the writes of its message's receipt (the broker's unacked record, the delivery's
# listing) that the turn waits for before it starts. Each is set once written, or failed.
_receipt_writes: dict[str, list[threading.Event]] = {}
# How long a turn waits for them before it runs anyway (a failed write is logged already).
RECEIPT_WAIT_SECONDS = 5.0


def _unacked_record_write(message: Any) -> threading.Event | None:
    """The write of the message's unacked record, if the broker's QoS (worker/broker.py)
    still has it outstanding."""
    qos = getattr(getattr(message, "channel", None), "qos", None)
    written = getattr(qos, "written", None)
    tag = getattr(message, "delivery_tag", None)
    return written(tag) if callable(written) and tag is not None else None


def _wait_until_listed(task_id: str) -> None:
    """A turn starts once its message is recorded as unacknowledged and listed among its
    worker's deliveries (``TurnRequest``): what brings it back if this worker dies."""
    for write in _receipt_writes.pop(task_id, ()):
        if not write.wait(RECEIPT_WAIT_SECONDS):
            log.warning("task %s: its receipt was not written after %.1f s; it runs anyway",
                        task_id, RECEIPT_WAIT_SECONDS)


def _delivery_of(request: Request) -> Delivery | None:
    """What handing this message on takes: for a Redis broker its delivery tag (the message
    itself waits in kombu's unacked hash); for another broker, a copy's kwargs as well."""
    tag = getattr(request.message, "delivery_tag", None)
    if tag is None:
        return None
    kwargs = request.kwargs if isinstance(request.kwargs, dict) else {}
    body = kwargs.get("turn") or kwargs.get("answer")
    message_id = body.get("message_id") if isinstance(body, dict) else None
    info = request.delivery_info or {}
    return Delivery(
        tag=str(tag), task=request.name, task_id=request.id,
        exchange=str(info.get("exchange") or ""), routing_key=str(info.get("routing_key") or ""),
        message_id=message_id if isinstance(message_id, str) else None,
        retries=int(request.request_dict.get("retries") or 0),
        broker=_this_broker()[0], kwargs=None if _this_broker()[1] else kwargs)


@functools.cache
def _this_broker() -> tuple[str, bool]:
    """The process's broker: its id, and whether it is Redis (whose messages are restored
    rather than copied). Fixed for the process, and read for every message it receives."""
    url = app.conf.broker_url
    return broker_id(url), is_redis_url(url)


@app.task(name=TURN_TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True,
          max_retries=None, Request=TurnRequest)
def run_turn_task(self: Task, *args: Any, turn: Any = None, **unexpected: Any) -> dict[str, Any]:
    settings = get_settings()
    task_id = self.request.id
    _wait_until_listed(task_id)
    try:
        services = get_services(settings)
    except AgentBackendError as exc:
        # Without a store or a bus nothing can be recorded or published; the broker keeps the
        # turn while there are retries left.
        log.error("turn task %s cannot reach its services: %s", task_id, exc)
        if exc.retryable and self.request.retries < settings.max_retries:
            delay = retry_delay(self.request.retries, settings)
            raise _retry(self, exc=exc, countdown=delay, **_shown(turn)) from exc
        _publish_error_without_services(settings, task_id, turn, exc)
        raise
    try:
        if args or unexpected:
            names = sorted(unexpected) + (["positional arguments"] if args else [])
            raise InvalidTurnPayload(
                "the task takes one keyword argument, turn; also got "
                + excerpt(", ".join(names), 200),
                message_id=valid_message_id(turn),
            )
        payload = parse_turn(turn, settings)
    except InvalidTurnPayload as exc:
        log.warning("turn rejected (task %s): %s", task_id, exc)
        metrics.TURNS.labels("invalid").inc()
        log_stage("error", level=logging.WARNING, code=exc.code, task_id=task_id,
                  message_id=exc.message_id)
        if exc.message_id:
            _publish_error(services, _error_ids(services.bus, task_id, exc.message_id, turn),
                           exc)
        raise

    progress = TurnProgress(_ids(payload, task_id),
                            reporter=_progress_reporter(self.request.hostname or ""),
                            interval_seconds=settings.progress_interval_seconds)
    log_stage("received", task_id=task_id, message_id=payload.message_id,
              conversation_id=payload.conversation_id, retries=self.request.retries)
    try:
        return run_turn(payload, task_id=task_id, services=services,
                        progress=progress).summary()
    except NotTheOwner as refused:
        _refuse_not_owned(services, payload, task_id, refused)
        progress.failed(refused.code, retrying=False)
        raise
    except TurnTakenOver as taken:
        raise _stand_down(task_id, taken) from None
    except ConversationBusy as busy:
        if _waited_too_long(busy, settings):
            failure: AgentBackendError = busy
        else:
            raise _retry(self, exc=busy, countdown=settings.conversation_wait_retry_seconds,
                         max_retries=None, **_shown(turn)) from None
    except AgentBackendError as exc:
        failure = exc.with_ids(message_id=payload.message_id)
    except Exception as exc:
        log.exception("turn %s hit an unexpected error", payload.message_id)
        failure = AgentBackendError(f"internal error: {type(exc).__name__}",
                                    message_id=payload.message_id)

    _retry_or_fail(self, services, _ids(payload, task_id), failure, progress, _shown(turn))


def _stand_down(task_id: str, taken: TurnTakenOver) -> Ignore:
    """End a copy whose turn another worker took over: no result, no event, no write (the
    task's state and the turn's end are the other copy's to set); the message is acknowledged."""
    log.warning("turn %s (task %s): taken over by another worker while this one was paused "
                "or cut off; this copy stops without publishing", taken.message_id, task_id)
    return Ignore()


def _retry_or_fail(task: Task, services: TurnServices, ids: TurnIds, failure: AgentBackendError,
                   progress: TurnProgress, shown: dict[str, str]) -> NoReturn:
    """Retry a failed attempt while the budget lasts, else end the turn with its error."""
    settings = services.settings
    attempts_done = failure.attempts or task.request.retries + 1
    if failure.retryable and not isinstance(failure, ConversationBusy) \
            and attempts_done <= settings.max_retries:
        delay = retry_delay(attempts_done - 1, settings)
        log.warning("turn %s attempt %d failed, retrying in %.1fs: %s", ids.message_id,
                    attempts_done, delay, failure)
        progress.failed(failure.code, retrying=True, delay=delay)
        _record_failure(services, ids.message_id, failure, final=False)
        raise _retry(task, exc=failure, countdown=delay, **shown)
    log.error("turn %s failed for good after %d attempt(s): %s", ids.message_id,
              attempts_done, failure)
    progress.failed(failure.code, retrying=False)
    _record_failure(services, ids.message_id, failure, final=True)
    _publish_error(services, ids, failure)
    raise failure


@app.task(name=RESUME_TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True,
          max_retries=None, Request=TurnRequest)
def resume_turn_task(self: Task, *args: Any, answer: Any = None,
                     **unexpected: Any) -> dict[str, Any]:
    """The continuation of a message after its user answered the question it asked.

    Refusals (an invalid answer, a question already answered or closed, another owner) end
    this task in FAILURE and publish nothing: the message's stream belongs to the turn, which
    goes on waiting for a valid answer or its expiry.
    """
    settings = get_settings()
    task_id = self.request.id
    _wait_until_listed(task_id)
    services = get_services(settings)
    try:
        if args or unexpected:
            raise InvalidTurnPayload("the task takes one keyword argument, answer")
        request = parse_human_input(answer, settings)
    except InvalidTurnPayload as exc:
        log.warning("answer rejected (task %s): %s", task_id, exc)
        raise
    message = services.store.get_message(request.message_id)
    ids = TurnIds(task_id, request.message_id, message.conversation_id if message else "")
    progress = TurnProgress(ids, reporter=_progress_reporter(self.request.hostname or ""),
                            interval_seconds=settings.progress_interval_seconds)
    log_stage("resumed", task_id=task_id, message_id=request.message_id,
              retries=self.request.retries)
    try:
        return resume_turn(request, task_id=task_id, services=services,
                           progress=progress).summary()
    except HumanInputRefused as refused:
        log.warning("answer to turn %s refused (task %s): %s", request.message_id, task_id,
                    refused)
        raise
    except TurnTakenOver as taken:
        raise _stand_down(task_id, taken) from None
    except ConversationBusy as busy:
        raise _retry(self, exc=busy, countdown=settings.conversation_wait_retry_seconds,
                     max_retries=None) from None
    except AgentBackendError as exc:
        failure: AgentBackendError = exc.with_ids(message_id=request.message_id)
    except Exception as exc:
        log.exception("continuation of turn %s hit an unexpected error", request.message_id)
        failure = AgentBackendError(f"internal error: {type(exc).__name__}",
                                    message_id=request.message_id)
    _retry_or_fail(self, services, ids, failure, progress, {})


@worker_init.connect
def _name_this_worker(sender: Any = None, **_: Any) -> None:
    """Name the process and list the messages it holds from its first delivery on."""
    global _deliveries
    settings = get_settings()
    name = name_this_worker(getattr(sender, "hostname", None) or "worker")
    client = redis.Redis.from_url(settings.pubsub_url, socket_timeout=5,
                                  socket_connect_timeout=5, health_check_interval=30)
    _deliveries = DeliveryRegistry(client, name)
    _deliveries.start_writer()
    log.info("worker %s: a dead worker's turns are taken over within about %.1f s", name,
             settings.conversation_lease_seconds + settings.takeover_scan_seconds)


@worker_shutdown.connect
def _write_last_deliveries(**_: Any) -> None:
    """Unlist what was acknowledged last, so that no takeover hands on a finished turn."""
    if _deliveries is not None:
        _deliveries.stop_writer()


@worker_ready.connect
def _start_takeovers(**_: Any) -> None:
    threading.Thread(target=_watch_for_dead_workers, name="takeover-start", daemon=True).start()


def _watch_for_dead_workers() -> None:
    """Prove this worker alive (its supervisor renews its alive key with its leases) and
    watch for dead ones. Waits for the services: a store that is down at start-up delays
    the watch, not the worker."""
    settings = get_settings()
    name = this_worker()
    if name is None:
        return
    while True:
        try:
            services = get_services(settings)
            break
        except AgentBackendError as exc:
            log.warning("the takeover watch waits for the worker's services: %s", exc)
            time.sleep(settings.takeover_scan_seconds * 4)
    services.supervisor.start()
    TakeoverWatcher(services.bus.redis, name, interval=settings.takeover_scan_seconds,
                    hand_on=_hand_on, record=services.store.record_takeover).start()


def _hand_on(delivery: Delivery) -> bool:
    """Put a dead worker's message back at the head of its queue: the original message for a
    Redis broker (out of kombu's unacked hash: no second delivery at the visibility timeout),
    a copy under the same task id for another broker. False if there was nothing to hand on
    (acknowledged meanwhile, or a message of another broker than this worker's)."""
    broker, on_redis = _this_broker()
    if delivery.broker != broker:
        return False
    if on_redis:
        from worker.broker import restore_unacked

        with app.connection_for_write() as connection:
            return restore_unacked(connection.default_channel, delivery.tag)
    if delivery.kwargs is None:
        return False
    app.send_task(delivery.task, kwargs=delivery.kwargs, task_id=delivery.task_id,
                  queue=delivery.routing_key or get_settings().queue,
                  retries=delivery.retries)
    return True


@worker_ready.connect
def _start_question_sweeper(**_: Any) -> None:
    threading.Thread(target=_sweep_expired_questions, name="question-sweeper",
                     daemon=True).start()


def _sweep_expired_questions() -> None:
    """End the questions nobody answered in time, each with one ``human_input_expired``.

    Every worker process sweeps; the store hands each expired message to one of them only.
    """
    settings = get_settings()
    while True:
        time.sleep(settings.question_sweep_seconds)
        try:
            services = get_services(settings)
            for row in services.store.expire_questions():
                services.bus.forget_question(row.message_id)
                log.info("question of turn %s expired unanswered", row.message_id)
                _publish_error(services, TurnIds(row.task_id, row.message_id,
                                                 row.conversation_id),
                               HumanInputExpired("the question was not answered in time",
                                                 message_id=row.message_id))
        except Exception:
            log.warning("sweeping expired questions failed; trying again", exc_info=True)


class StreamingState:
    """Reports running turns to Celery: a ``STREAMING`` state with its progress in the result
    backend (``AsyncResult.state``/``.info``) and a ``task-streaming`` event, which Flower's task
    view shows live (it turns a custom event type into the task's state).

    Called by the process's one ``ProgressReporter`` thread with every report that is due; the
    states are written together (``store_progress``). The events go out with the worker's own
    task events (``task_event_dispatcher``), in order with them; without a running consumer,
    one dispatcher of its own (a producer on the broker) serves every report instead of one
    built per report.
    """

    def __init__(self, hostname: str) -> None:
        self._hostname = hostname
        self._dispatcher: Any = None

    def __call__(self, reports: dict[str, dict[str, Any]]) -> None:
        store_progress(run_turn_task.backend, reports, STREAMING)
        dispatcher = task_event_dispatcher()
        if dispatcher is not None:
            # After the task's own task-received and task-started, which a green worker sends
            # in batches: sent apart, Flower could see the progress before the task started.
            for task_id, progress in reports.items():
                dispatcher.send("task-streaming", uuid=task_id, **progress)
            return
        if self._dispatcher is None:
            self._dispatcher = app.events.Dispatcher(app.connection_for_write(),
                                                     hostname=self._hostname)
        try:
            for task_id, progress in reports.items():
                self._dispatcher.send("task-streaming", uuid=task_id, **progress)
        except Exception:
            dispatcher, self._dispatcher = self._dispatcher, None  # the next report reconnects
            with contextlib.suppress(Exception):
                dispatcher.close()
                dispatcher.connection.release()
            raise


_reporters: dict[str, ProgressReporter] = {}
_reporters_guard = threading.Lock()


def _progress_reporter(hostname: str) -> ProgressReporter:
    """The process's reporter (one per worker name: a process runs one worker)."""
    with _reporters_guard:
        if hostname not in _reporters:
            _reporters[hostname] = ProgressReporter(StreamingState(hostname))
        return _reporters[hostname]


def _retry(task: Task, **options: Any) -> BaseException:
    """``Task.retry``, except that a retry the broker cannot take hands the turn back.

    Celery turns a failure to publish the retry into ``Reject(requeue=False)``, which drops the
    message: a turn whose Redis blinked would be lost without an end. Requeueing instead leaves
    it with the broker (at worst unacknowledged until the visibility timeout restores it).
    """
    try:
        return task.retry(**options)
    except Reject as rejected:
        if rejected.requeue:
            raise
        log.warning("retry of task %s could not be enqueued (%s); handing the turn back to "
                    "the broker", task.request.id, rejected.reason)
        raise Reject(rejected.reason, requeue=True) from None


def _shown(turn: Any) -> dict[str, str]:
    """What a retried turn shows in Flower: Celery would otherwise rebuild it from the full
    payload (query, inputs, agent settings)."""
    fields = turn if isinstance(turn, dict) else {}
    return {"argsrepr": TURN_ARGSREPR, "kwargsrepr": turn_kwargsrepr(fields)}


def _waited_too_long(busy: ConversationBusy, settings: Settings) -> bool:
    if busy.queued_since is None:
        return False
    queued_since = busy.queued_since
    if queued_since.tzinfo is None:  # SQLite hands timestamps back without their zone
        queued_since = queued_since.replace(tzinfo=UTC)
    waited = (datetime.now(UTC) - queued_since).total_seconds()
    return waited > settings.max_conversation_wait_seconds


@task_revoked.connect
def _end_revoked_turn(sender: Any = None, request: Any = None, **_: Any) -> None:
    """A turn revoked before it ran (stop_turn, Flower) still ends, as stopped.

    Celery drops a revoked task without running it; without this its client would wait forever.
    A turn revoked while running is stopped by the supervisor instead (``TurnRequest``).
    """
    if request is None or getattr(sender, "name", None) != TURN_TASK_NAME:
        return
    kwargs = getattr(request, "kwargs", None) or {}
    try:
        payload = parse_turn(kwargs.get("turn"), get_settings())
    except InvalidTurnPayload:
        return
    try:
        services = get_services(get_settings())
        try:
            end_stopped_before_running(payload, task_id=request.id, services=services)
        except NotTheOwner as refused:
            _refuse_not_owned(services, payload, request.id, refused)
    except AgentBackendError as exc:
        log.error("could not end revoked turn %s: %s", payload.message_id, exc)


def _raw_ids(task_id: str, message_id: str, turn: Any) -> TurnIds:
    """The ids of a turn whose payload was not (or could not be) validated: an invalid
    conversation id (a lone surrogate, a 60 KB string) is left out of its error event."""
    conversation_id = turn.get("conversation_id") if isinstance(turn, dict) else None
    return TurnIds(task_id, message_id, valid_identifier(conversation_id) or "")


def _raw_owner(turn: Any) -> str:
    """The fingerprint of whoever a raw payload says sent it, valid ids or not."""
    fields = turn if isinstance(turn, dict) else {}
    return owner_fingerprint(*(repr(fields.get(name)) if not isinstance(fields.get(name), str)
                               else fields[name] for name in ("tenant_id", "app_id", "user_id")))


def _error_ids(bus: EventBus, task_id: str, message_id: str, turn: Any) -> TurnIds:
    """Where the error of a turn that was not validated goes.

    On the message's own channel when no turn of that message id has an owner yet: the sender
    is recorded as its owner first, so the gateway relays the error to the sender's stream
    token. Otherwise (another owner's message, whose clients must not see it, or the same
    owner's, whose turn has its own end) on the sender's refusal stream.
    """
    ids = _raw_ids(task_id, message_id, turn)
    sender = _raw_owner(turn)
    try:
        first = bus.record_owner_if_none(message_id, sender)
    except AgentBackendError:
        first = True  # publishing will fail the same way and say so
    return ids if first else replace(ids, stream=refusal_stream(message_id, sender))


def _refuse_not_owned(services: TurnServices, payload: TurnPayload, task_id: str,
                      refused: NotTheOwner) -> None:
    """One ``error`` for a turn naming another owner's conversation or message, on a stream
    named by its sender: the rightful owner's clients never read it, the sender's can."""
    log.warning("turn %s (task %s) refused: its conversation or message belongs to another "
                "owner", payload.message_id, task_id)
    metrics.TURNS.labels("refused").inc()
    ids = replace(_ids(payload, task_id),
                  stream=refusal_stream(payload.message_id, payload.owner))
    _publish_error(services, ids, refused)


def _ids(payload: TurnPayload, task_id: str) -> TurnIds:
    return TurnIds(task_id, payload.message_id, payload.conversation_id)


def _record_failure(services: TurnServices, message_id: str, failure: AgentBackendError,
                    *, final: bool) -> None:
    try:
        services.store.mark_unfinished(message_id, final=final, code=failure.code,
                                       error=str(failure))
    except AgentBackendError as exc:
        log.error("could not record the failure of turn %s: %s", message_id, exc)


def _publish_error_without_services(settings: Settings, task_id: str, turn: Any,
                                    failure: AgentBackendError) -> None:
    """End a turn whose services never came up (its database was down through every retry).

    Nothing can be recorded, but its client must not wait forever: the ``error`` event goes out
    through a bus of its own, on the pub/sub Redis alone.
    """
    message_id = valid_message_id(turn)
    if message_id is None:
        return
    client = redis.Redis.from_url(settings.pubsub_url, socket_timeout=5, socket_connect_timeout=5)
    try:
        bus = EventBus.from_settings(client, settings)
        bus.turn(_error_ids(bus, task_id, message_id, turn)).error(
            status=failure.status, code=failure.code, message=str(failure))
    except AgentBackendError as exc:
        log.error("could not publish the error event of turn %s: %s", message_id, exc)
    finally:
        client.close()


def _publish_error(services: TurnServices, ids: TurnIds, failure: AgentBackendError) -> None:
    try:
        services.bus.turn(ids).error(status=failure.status, code=failure.code,
                                     message=str(failure))
    except AgentBackendError as exc:
        log.error("could not publish the error event of turn %s: %s", ids.message_id, exc)
