"""The producer helper: how a web tier enqueues a turn and learns where to listen.

A web tier does not need this module (``send_task(TURN_TASK_NAME, kwargs={"turn": {...}})`` is the
whole interface, see docs/contract.md), but using it buys validation before enqueueing, so that a
bad payload fails in the request that made it rather than in a worker.

Subscribe to ``channel_for(message_id)`` before enqueueing when every event matters: Redis
pub/sub delivers only to subscribers present at publish time.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from celery import Celery

from config.celery import TURN_TASK_NAME
from config.settings import Settings, get_settings
from worker.payload import TurnPayload, parse_turn


@dataclass(frozen=True)
class SubmittedTurn:
    task_id: str
    message_id: str
    conversation_id: str
    channel: str


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
    result = celery_app.send_task(
        TURN_TASK_NAME, kwargs={"turn": payload.model_dump(mode="json")}, queue=settings.queue
    )
    return SubmittedTurn(
        task_id=result.id,
        message_id=payload.message_id,
        conversation_id=payload.conversation_id,
        channel=settings.channel_for(payload.message_id),
    )
