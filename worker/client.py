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
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import redis
from celery import Celery

from config.celery import TURN_ARGSREPR, TURN_TASK_NAME, turn_kwargsrepr
from config.settings import Settings, get_settings
from gateway.tokens import mint_stream_token
from worker.ownership import owner_fingerprint
from worker.payload import TurnPayload, parse_turn
from worker.supervisor import CONTROL_CHANNEL, stop_key


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
    _remember_task(settings, task_id=task_id, message_id=payload.message_id)
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
    task_id: str | None
    message_id: str


def stop_turn(
    *,
    task_id: str | None = None,
    message_id: str | None = None,
    celery_app: Celery | None = None,
    settings: Settings | None = None,
) -> StopRequest:
    """Stop a turn by its task id or message id, whether it is queued or running.

    Three signals, each for a case the others miss: a stop flag in Redis (read by a turn when it
    starts, so a queued turn ends without calling the backend, even after a worker restart); a
    message on the control channel (a running turn's worker notices within its supervisor's
    tick and cancels the backend run); and a Celery revoke (the same path as Flower's revoke).
    The turn then ends with ``message_end`` and ``status: stopped``.
    """
    settings = settings or get_settings()
    if message_id is None and task_id is None:
        raise ValueError("stop_turn needs a task_id or a message_id")
    bus = _bus(settings)
    if message_id is None:
        found = bus.get(_message_of(task_id))
        if found is None:
            raise LookupError(f"no turn is known for task {task_id}")
        message_id = found.decode()
    if task_id is None:
        found = bus.get(_task_of(message_id))
        task_id = found.decode() if found is not None else None
    pipeline = bus.pipeline(transaction=False)
    pipeline.set(stop_key(message_id), "1", ex=settings.turn_state_ttl_seconds)
    pipeline.publish(CONTROL_CHANNEL, json.dumps({"stop": message_id}))
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


def _remember_task(settings: Settings, *, task_id: str, message_id: str) -> None:
    """Let ``stop_turn`` find either id from the other."""
    pipeline = _bus(settings).pipeline(transaction=False)
    pipeline.set(_task_of(message_id), task_id, ex=settings.turn_state_ttl_seconds)
    pipeline.set(_message_of(task_id), message_id, ex=settings.turn_state_ttl_seconds)
    pipeline.execute()

