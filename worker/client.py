"""The producer helper: how a web tier enqueues a turn and learns where to listen.

A web tier does not need this module (``send_task(TURN_TASK_NAME, kwargs={"turn": {...}})`` is the
whole interface, see docs/contract.md), but using it buys validation before enqueueing, so that a
bad payload fails in the request that made it rather than in a worker.

Subscribe to ``channel_for(message_id)`` before enqueueing when every event matters: Redis
pub/sub delivers only to subscribers present at publish time. Or hand the browser the turn's
``stream_token`` and let it read the turn from the SSE gateway, which replays what it missed
(docs/gateway.md).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import redis
from celery import Celery

from config.celery import (
    RESUME_TASK_NAME,
    TURN_ARGSREPR,
    TURN_TASK_NAME,
    celery_config,
    turn_kwargsrepr,
)
from config.settings import Settings, get_settings
from gateway.tokens import mint_stream_token
from worker.errors import AnswerTooLate, HumanInputRefused
from worker.ownership import owner_fingerprint, owner_key
from worker.payload import (
    HumanInputRequest,
    TurnPayload,
    parse_human_answer,
    parse_human_input,
    parse_turn,
    valid_identifier,
)
from worker.questions import PendingQuestion, answered_key, check_answer, question_key
from worker.supervisor import CONTROL_CHANNEL, stop_key, stop_request


@dataclass(frozen=True)
class SubmittedTurn:
    task_id: str
    message_id: str
    conversation_id: str
    channel: str
    # Lets the turn's user read it from the SSE gateway (docs/gateway.md); give it to them. It
    # names the turn's owner (tenant, app, user), so it opens the turn only if the worker
    # recorded that owner for the message.
    stream_token: str


def stream_token_for(message_id: str, user_id: str, settings: Settings | None = None, *,
                     tenant_id: str, app_id: str) -> str:
    """A token for the SSE gateway that lets ``user_id`` of ``tenant_id``/``app_id`` read turn
    ``message_id`` for ``AGENT_TURN_GATEWAY_TOKEN_TTL_SECONDS``, e.g. to mint a fresh one when a
    page reloads.

    Tenant and app are required (keyword-only, no defaults) because they are part of the owner
    the token is signed for: the gateway relays the turn only to the owner the worker recorded
    for it, and anyone else gets their own refusal instead (docs/gateway.md, "Owners").
    """
    settings = settings or get_settings()
    return mint_stream_token(settings.gateway_secret.get_secret_value().encode(),
                             message_id=message_id, user_id=user_id,
                             owner=owner_fingerprint(tenant_id, app_id, user_id),
                             ttl_seconds=settings.gateway_token_ttl_seconds)


def new_id() -> str:
    return str(uuid.uuid4())


def prepare_turn(fields: Mapping[str, Any], settings: Settings | None = None) -> TurnPayload:
    """Validate a turn, giving it a new message id (and conversation id) where it has none."""
    settings = settings or get_settings()
    raw = dict(fields)
    raw.setdefault("message_id", new_id())
    raw.setdefault("conversation_id", new_id())
    return parse_turn(raw, settings)


def submit_turn(
    fields: Mapping[str, Any] | TurnPayload,
    *,
    celery_app: Celery | None = None,
    settings: Settings | None = None,
) -> SubmittedTurn:
    """Validate and enqueue one turn; raises ``InvalidTurnPayload`` and enqueues nothing if bad."""
    settings = settings or get_settings()
    payload = fields if isinstance(fields, TurnPayload) else prepare_turn(fields, settings)
    if celery_app is None:
        from worker.app import app as celery_app
    task_id = new_id()
    _remember_task(settings, task_id=task_id, message_id=payload.message_id, owner=payload.owner)
    turn = payload.model_dump(mode="json")
    result = celery_app.send_task(
        TURN_TASK_NAME, kwargs={"turn": turn}, queue=settings.queue, task_id=task_id,
        argsrepr=TURN_ARGSREPR, kwargsrepr=turn_kwargsrepr(turn),
    )
    return SubmittedTurn(
        task_id=result.id,
        message_id=payload.message_id,
        conversation_id=payload.conversation_id,
        channel=settings.channel_for(payload.message_id),
        stream_token=stream_token_for(payload.message_id, payload.user_id, settings,
                                      tenant_id=payload.tenant_id, app_id=payload.app_id),
    )


@dataclass(frozen=True)
class StopRequest:
    # The task revoked, or None: none is known for the message, or the one known is not the
    # caller's (a stop never revokes another owner's task).
    task_id: str | None
    message_id: str


def stop_turn(
    *,
    task_id: str | None = None,
    message_id: str | None = None,
    tenant_id: str,
    app_id: str,
    user_id: str,
    celery_app: Celery | None = None,
    settings: Settings | None = None,
) -> StopRequest:
    """Stop a turn of (tenant, app, user) by its task id or message id, queued or running.

    Three signals, each for a case the others miss: a stop flag in Redis (read by a turn when it
    starts, so a queued turn ends without calling the backend, even after a worker restart); a
    message on the control channel (a running turn's worker notices within its supervisor's
    tick and cancels the backend run); and a Celery revoke (the same path as Flower's revoke).
    The turn then ends with ``message_end`` and ``status: stopped``.

    Only the turn's owner can stop it: the flag and the control message name the caller, and
    the worker obeys only the owner its store agreed to; the revoke is sent only for a task
    ``submit_turn`` recorded for the caller. A stop of another owner's message looks like a
    stop of an unknown one (nothing revoked, ``task_id`` None), so a caller cannot learn
    whether it exists; a task id that is unknown or another owner's raises ``LookupError``.
    """
    settings = settings or get_settings()
    if message_id is None and task_id is None:
        raise ValueError("stop_turn needs a task_id or a message_id")
    owner_ids = {"tenant_id": tenant_id, "app_id": app_id, "user_id": user_id}
    if message_id is not None:
        owner_ids["message_id"] = message_id
    for name, value in owner_ids.items():
        if valid_identifier(value) is None:
            raise ValueError(f"stop_turn: {name} is not a valid id")
    owner = owner_fingerprint(tenant_id, app_id, user_id)
    bus = _bus(settings)
    if task_id is not None:
        submitted = _submitted_task(bus, task_id)
        if submitted is None or submitted[1] != owner:
            raise LookupError(f"no turn is known for task {valid_identifier(task_id) or '?'}")
        message_id = submitted[0]
    else:
        assert message_id is not None
        found = bus.get(_task_of(message_id))
        candidate = found.decode() if found is not None else None
        submitted = _submitted_task(bus, candidate) if candidate is not None else None
        task_id = candidate if submitted == (message_id, owner) else None
    pipeline = bus.pipeline(transaction=False)
    pipeline.set(stop_key(message_id, owner), "1", ex=settings.turn_state_ttl_seconds)
    pipeline.publish(CONTROL_CHANNEL, stop_request(message_id, owner))
    pipeline.execute()
    if task_id is not None:
        if celery_app is None:
            from worker.app import app as celery_app
        celery_app.control.revoke(task_id)
    return StopRequest(task_id=task_id, message_id=message_id)


@lru_cache(maxsize=8)
def _bus_for(url: str) -> redis.Redis:
    """One pooled client per Redis URL for the life of the producer process."""
    return redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)


def _bus(settings: Settings) -> redis.Redis:
    return _bus_for(settings.pubsub_url)


def _task_of(message_id: str) -> str:
    return f"agent-turn:task-of:{message_id}"


def _message_of(task_id: str | None) -> str:
    return f"agent-turn:message-of:{task_id}"


def _remember_task(settings: Settings, *, task_id: str, message_id: str, owner: str) -> None:
    """Let ``stop_turn`` find either id from the other, and whose the task is.

    The task's record is the one to trust: its key is the new task id, so no other submission
    can overwrite it, whereas any submission naming the message id rewrites ``task-of``.
    """
    pipeline = _bus(settings).pipeline(transaction=False)
    pipeline.set(_task_of(message_id), task_id, ex=settings.turn_state_ttl_seconds)
    pipeline.set(_message_of(task_id), json.dumps({"m": message_id, "o": owner}),
                 ex=settings.turn_state_ttl_seconds)
    pipeline.execute()


def _submitted_task(bus: redis.Redis, task_id: str) -> tuple[str, str] | None:
    """(message id, owner fingerprint) that ``submit_turn`` recorded for a task, or None."""
    if valid_identifier(task_id) is None:
        return None
    found = bus.get(_message_of(task_id))
    try:
        record = json.loads(found) if found is not None else None
    except ValueError:
        return None
    if not isinstance(record, dict):
        return None
    message_id, owner = record.get("m"), record.get("o")
    if not isinstance(message_id, str) or not isinstance(owner, str):
        return None
    return message_id, owner


def producer_app(settings: Settings | None = None) -> Celery:
    """A Celery app that only sends: the broker, result backend and queue routes of
    ``settings`` (config/celery.py), none of the worker's tasks or start-up code.

    For a process that enqueues but is not a worker, such as the gateway. The helpers here
    default to ``worker.app``'s app, which imports the worker's tasks with it.
    """
    app = Celery("agent-turn-producer")
    app.config_from_object(celery_config(settings or get_settings()))
    return app


def submit_human_input(
    message_id: str,
    tool_call_id: str,
    action: str,
    values: Mapping[str, Any] | None = None,
    *,
    tenant_id: str,
    app_id: str,
    user_id: str,
    celery_app: Celery | None = None,
    settings: Settings | None = None,
) -> str:
    """Answer the question a turn asked its user (ask_human); return the continuation's task id.

    Checked before anything is enqueued, each with a clear error: the answer's shape
    (``InvalidTurnPayload``); that the message waits for an answer to this call, from this
    owner, with an action it offered and values of the right size and types
    (``HumanInputRefused``; ``AnswerTooLate``, one of them, past the question's expiry); and
    that no answer to the call was accepted before. The worker checks again against the
    store, which decides: a continuation enqueued twice, or redelivered, makes one run.
    """
    settings = settings or get_settings()
    raw = {"tenant_id": tenant_id, "app_id": app_id, "user_id": user_id,
           "message_id": message_id, "tool_call_id": tool_call_id, "action": action,
           "values": dict(values or {})}
    answer = parse_human_input(raw, settings)
    question = _open_question(message_id, owner_fingerprint(tenant_id, app_id, user_id),
                              settings)
    return _enqueue_answer(answer, question, celery_app=celery_app, settings=settings)


def submit_human_input_for(
    message_id: str,
    tool_call_id: Any,
    action: Any,
    values: Any = None,
    *,
    owner: str,
    celery_app: Celery | None = None,
    settings: Settings | None = None,
) -> str:
    """``submit_human_input`` for an owner known only by its fingerprint, as a stream token
    names it (``o``): what the gateway has when a browser answers with its token.

    The same checks, in the same order, with the same errors. The continuation's payload
    names the owner by ids, as the worker's store checks it: they come from the question's
    record, which the worker wrote with them, and are used only if they hash to ``owner``.
    Arguments may be anything a client sent; they are validated, never trusted.
    """
    settings = settings or get_settings()
    fields = parse_human_answer({"tool_call_id": tool_call_id, "action": action,
                                 "values": {} if values is None else values}, settings)
    question = _open_question(message_id, owner, settings)
    ids = question.get("owner")
    if not isinstance(ids, dict) or not all(
            isinstance(ids.get(name), str) for name in ("tenant_id", "app_id", "user_id")) \
            or owner_fingerprint(ids["tenant_id"], ids["app_id"], ids["user_id"]) != owner:
        # A question recorded by a worker from before owners' ids were recorded, or a record
        # that disagrees with the owner key: refused as if not waiting, naming nobody.
        raise _not_waiting(message_id)
    answer = parse_human_input({"tenant_id": ids["tenant_id"], "app_id": ids["app_id"],
                                "user_id": ids["user_id"], "message_id": message_id,
                                **fields.model_dump()}, settings)
    return _enqueue_answer(answer, question, celery_app=celery_app, settings=settings)


def _not_waiting(message_id: str) -> HumanInputRefused:
    """The one refusal for an unknown message, another owner's, or one not waiting: a sender
    cannot tell them apart, so cannot learn whether another owner's message exists."""
    return HumanInputRefused("the message is not waiting for an answer (unknown, answered "
                             "already or expired)", message_id=message_id)


def _open_question(message_id: str, owner: str, settings: Settings) -> dict[str, Any]:
    """The record of the message's open question if ``owner`` owns the message, else the
    refusal; ``AnswerTooLate`` once it is past its expiry."""
    summary, recorded = _bus(settings).mget([question_key(message_id), owner_key(message_id)])
    if summary is None or recorded is None or recorded.decode() != owner:
        raise _not_waiting(message_id)
    question: dict[str, Any] = json.loads(summary)
    expires_at = question.get("expires_at")
    if isinstance(expires_at, int | float) and expires_at <= time.time():
        raise AnswerTooLate("the question has expired", message_id=message_id)
    return question


def _enqueue_answer(answer: HumanInputRequest, question: dict[str, Any], *,
                    celery_app: Celery | None, settings: Settings) -> str:
    """Check the answer against its question, claim the call's one answer, enqueue it."""
    message_id = answer.message_id
    check_answer(PendingQuestion.from_json(question), tool_call_id=answer.tool_call_id,
                 action=answer.action, values=answer.values,
                 max_bytes=settings.max_human_input_bytes, message_id=message_id)
    bus = _bus(settings)
    answered = answered_key(message_id, answer.tool_call_id)
    if not bus.set(answered, "1", nx=True, ex=int(settings.human_input_ttl_seconds) + 60):
        raise HumanInputRefused("this question was answered already", message_id=message_id)
    if celery_app is None:
        from worker.app import app as celery_app
    try:
        result = celery_app.send_task(
            RESUME_TASK_NAME, kwargs={"answer": answer.model_dump()}, queue=settings.queue,
            argsrepr="()", kwargsrepr=repr({"answer": {"message_id": message_id,
                                                       "action": answer.action}}))
    except BaseException:
        # Not enqueued, as far as this process knows: let the user answer again rather than
        # be told it was answered. Should the task have reached the broker after all, the
        # worker's store still takes one answer only.
        bus.delete(answered)
        raise
    return str(result.id)
