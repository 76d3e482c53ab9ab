"""A question the agent asks the user (the ``ask_human`` tool), and the answer that resumes it.

A run that needs a person ends with ``run_succeeded`` carrying a ``deferred_tool_call`` instead
of ``output`` (../shared/agent-protocol.md). The turn then ends its current leg with one
``human_input_required`` event and the message waits (``awaiting_input``) with what resuming
takes: the run's snapshot and the question. An answer (``worker.client.submit_human_input``)
enqueues a continuation, which starts a new run with ``deferred_tool_results`` and streams on
the same message. This module holds the two shapes and their checks, pure:

- ``PendingQuestion``: the backend's call, checked and bounded before any of it reaches a
  client (the backend is trusted no more than a payload);
- ``HumanAnswer``: what a user sends back, checked against the question it answers (an action
  it offered, values within size and of plain JSON types, fields it asked for).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from worker.errors import HumanInputRefused, ProtocolViolation
from worker.logs import excerpt

ASK_HUMAN_TOOL = "ask_human"
# The action a question without actions offers, as the reference client answers.
DEFAULT_ACTION = {"id": "submit", "label": "Submit"}
MAX_QUESTION_TEXT_CHARS = 8_000
MAX_QUESTION_ITEMS = 32


def question_key(message_id: str) -> str:
    """The open question of a message, for producers to check an answer before enqueueing."""
    return f"agent-turn:question:{message_id}"


def answered_key(message_id: str, tool_call_id: str) -> str:
    """Set by the first answer accepted for a call: a second one is refused at once."""
    return f"agent-turn:answered:{message_id}:{tool_call_id}"


@dataclass(frozen=True, slots=True)
class PendingQuestion:
    tool_call_id: str
    tool_name: str
    args: dict[str, Any]

    @property
    def actions(self) -> list[dict[str, Any]]:
        offered = self.args.get("actions")
        return offered if isinstance(offered, list) and offered else [DEFAULT_ACTION]

    @property
    def field_names(self) -> set[str]:
        names = set()
        for item in self.args.get("fields") or []:
            if isinstance(item, dict):
                name = item.get("name", item.get("id"))
                if isinstance(name, str):
                    names.add(name)
        return names

    def event_fields(self, expires_at: datetime) -> dict[str, Any]:
        """The ``human_input_required`` event's fields."""
        return {"tool_call_id": self.tool_call_id, "tool_name": self.tool_name,
                "args": self.args, "actions": self.actions,
                "expires_at": int(expires_at.timestamp())}

    def as_json(self) -> dict[str, Any]:
        return {"tool_call_id": self.tool_call_id, "tool_name": self.tool_name,
                "args": self.args}

    def record(self, expires_at: datetime, *, tenant_id: str, app_id: str,
               user_id: str) -> dict[str, Any]:
        """What the worker records under ``question_key`` for producers to check an answer
        against before they enqueue it. The owner's ids ride along for a producer that knows
        the owner only by fingerprint (the gateway, from a stream token): it enqueues the
        answer under these ids once they hash to the token's owner."""
        return {**self.as_json(), "actions": self.actions,
                "expires_at": int(expires_at.timestamp()),
                "owner": {"tenant_id": tenant_id, "app_id": app_id, "user_id": user_id}}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> PendingQuestion:
        return cls(raw["tool_call_id"], raw["tool_name"], raw["args"])


def question_from_call(call: Any, *, run_id: str, message_id: str) -> PendingQuestion:
    """The backend's ``deferred_tool_call`` as a question, or ``ProtocolViolation``."""
    ids = {"run_id": run_id, "message_id": message_id}
    if not isinstance(call, dict):
        raise ProtocolViolation("deferred_tool_call is not an object", **ids)
    call_id, name, args = call.get("tool_call_id"), call.get("tool_name"), call.get("args")
    if not isinstance(call_id, str) or not call_id or len(call_id) > 128:
        raise ProtocolViolation("deferred_tool_call has no usable tool_call_id", **ids)
    if not isinstance(name, str) or not name:
        raise ProtocolViolation("deferred_tool_call has no tool_name", **ids)
    if isinstance(args, str):  # a model's arguments may come as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            raise ProtocolViolation("deferred_tool_call args are not JSON", **ids) from None
    if not isinstance(args, dict):
        raise ProtocolViolation("deferred_tool_call args are not an object", **ids)
    shown: dict[str, Any] = {}
    for key in ("title", "question", "markdown", "urgency"):
        value = args.get(key)
        if value is not None:
            if not isinstance(value, str):
                raise ProtocolViolation(f"ask_human {key} is not text", **ids)
            shown[key] = value[:MAX_QUESTION_TEXT_CHARS]
    for key in ("fields", "actions"):
        value = args.get(key)
        if value is not None:
            if not isinstance(value, list) or len(value) > MAX_QUESTION_ITEMS \
                    or not all(isinstance(item, dict) for item in value):
                raise ProtocolViolation(f"ask_human {key} is not a short list of objects",
                                        **ids)
            shown[key] = value
    if len(json.dumps(shown)) > 4 * MAX_QUESTION_TEXT_CHARS:
        raise ProtocolViolation("ask_human question is too large", **ids)
    for action in shown.get("actions", []):
        if not isinstance(action.get("id"), str):
            raise ProtocolViolation("ask_human action without an id", **ids)
    return PendingQuestion(call_id, name, shown)


@dataclass(frozen=True, slots=True)
class HumanAnswer:
    tool_call_id: str
    action: dict[str, Any]
    values: dict[str, Any]

    def deferred_tool_results(self) -> dict[str, Any]:
        """What the continuation's ``CreateRunRequest`` carries back to the backend."""
        return {"calls": {self.tool_call_id: {"status": "submitted", "action": self.action,
                                              "values": self.values}},
                "metadata": {}}

    def as_json(self) -> dict[str, Any]:
        return {"tool_call_id": self.tool_call_id, "action": self.action,
                "values": self.values}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> HumanAnswer:
        return cls(raw["tool_call_id"], raw["action"], raw["values"])


def check_answer(question: PendingQuestion, *, tool_call_id: Any, action: Any, values: Any,
                 max_bytes: int, message_id: str | None = None) -> HumanAnswer:
    """The answer if it answers ``question``; else ``HumanInputRefused`` saying why."""
    def refuse(reason: str) -> HumanInputRefused:
        return HumanInputRefused(reason, message_id=message_id)

    if tool_call_id != question.tool_call_id:
        raise refuse(f"no open question has tool_call_id {excerpt(tool_call_id, 80)!s}")
    offered = {item["id"]: item for item in question.actions}
    if not isinstance(action, str) or action not in offered:
        raise refuse(f"action {excerpt(action, 40)} is not one of {sorted(offered)}")
    if not isinstance(values, dict):
        raise refuse("values must be an object")
    try:
        size = len(json.dumps(values, ensure_ascii=False, allow_nan=False).encode())
    except (TypeError, ValueError, RecursionError):
        raise refuse("values must be plain JSON") from None
    if size > max_bytes:
        raise refuse(f"values are {size} bytes, more than {max_bytes}")
    for key, value in values.items():
        if not isinstance(key, str):
            raise refuse("values' keys must be text")
        if not (value is None or isinstance(value, str | int | float | bool) or (
                isinstance(value, list) and all(isinstance(item, str) for item in value))):
            raise refuse(f"value of {excerpt(key, 40)} must be text, a number, a boolean, "
                         "null or a list of text")
    names = question.field_names
    unknown = sorted(set(values) - names) if names else []
    if unknown:
        raise refuse(f"the question asked for no field {excerpt(', '.join(unknown), 80)}")
    chosen = offered[action]
    return HumanAnswer(question.tool_call_id,
                       {"id": chosen["id"], "label": str(chosen.get("label", chosen["id"]))},
                       values)
