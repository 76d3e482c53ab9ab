"""The conversation as the stub keeps it in the ``history`` layer of a session snapshot.

A real server keeps pydantic-ai messages there; the stub keeps a flat list of entries, each with
a ``role``, that a test can read at a glance and from which the stub derives all it needs: the
turn number (one ``user`` entry per turn, so multi-turn continuity bugs show up as wrong turn
numbers in the answer) and the tool calls still waiting for a result (a deferred ``ask_human``
call, which a later run resumes with ``deferred_tool_results``, as the reference server matches
the results against the call it finds in its history).

Entries, in the order a turn adds them:

- ``{"role": "user", "content": <query>}`` — once per turn, not again when a run resumes;
- ``{"role": "thinking", "content": <the whole thought>}``;
- ``{"role": "tool_call", "tool_call_id", "tool_name", "args": <JSON text>}``;
- ``{"role": "tool_return", "tool_call_id", "tool_name", "content": <JSON>}`` or
  ``{"role": "retry_prompt", "tool_call_id", "tool_name", "content": <the refusal>}``;
- ``{"role": "assistant", "content": <the answer>}`` — last, unless the run ended on a
  deferred call (whose ``tool_call`` entry is then last and has no result yet).

Pure: no I/O.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "HISTORY_LAYER",
    "answered_in_this_turn",
    "assistant",
    "messages_of",
    "pending_calls",
    "retry_prompt",
    "snapshot",
    "thinking",
    "tool_call",
    "tool_return",
    "turns_in",
    "user",
]

HISTORY_LAYER = "history"
_RESULT_ROLES = frozenset({"tool_return", "retry_prompt"})


def user(query: str) -> dict[str, Any]:
    return {"role": "user", "content": query}


def assistant(answer: str) -> dict[str, Any]:
    return {"role": "assistant", "content": answer}


def thinking(thought: str) -> dict[str, Any]:
    return {"role": "thinking", "content": thought}


def tool_call(tool_call_id: str, tool_name: str, args: str) -> dict[str, Any]:
    return {"role": "tool_call", "tool_call_id": tool_call_id, "tool_name": tool_name,
            "args": args}


def tool_return(tool_call_id: str, tool_name: str, content: Any) -> dict[str, Any]:
    return {"role": "tool_return", "tool_call_id": tool_call_id, "tool_name": tool_name,
            "content": content}


def retry_prompt(tool_call_id: str, tool_name: str, refusal: str) -> dict[str, Any]:
    return {"role": "retry_prompt", "tool_call_id": tool_call_id, "tool_name": tool_name,
            "content": refusal}


def messages_of(snapshot: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The history entries of a snapshot (none without a snapshot or a history layer)."""
    if not snapshot:
        return []
    for layer in snapshot.get("layers", []):
        if isinstance(layer, dict) and layer.get("name") == HISTORY_LAYER:
            state = layer.get("runtime_state")
            messages = state.get("messages") if isinstance(state, dict) else None
            if isinstance(messages, list):
                return [message for message in messages if isinstance(message, dict)]
    return []


def turns_in(messages: list[dict[str, Any]]) -> int:
    """How many turns the history holds: its user entries."""
    return sum(1 for message in messages if message.get("role") == "user")


def pending_calls(messages: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The tool calls that have no result yet, by ``tool_call_id``, in the order made."""
    pending: dict[str, dict[str, Any]] = {}
    for message in messages:
        call_id = message.get("tool_call_id")
        if not isinstance(call_id, str):
            continue
        if message.get("role") == "tool_call":
            pending[call_id] = message
        elif message.get("role") in _RESULT_ROLES:
            pending.pop(call_id, None)
    return pending


def answered_in_this_turn(messages: list[dict[str, Any]], tool_name: str) -> int:
    """Results of ``tool_name`` calls since the last user entry: how far a turn that asked
    (and was resumed) has come through its process."""
    count = 0
    for message in messages:
        if message.get("role") == "user":
            count = 0
        elif message.get("role") == "tool_return" and message.get("tool_name") == tool_name:
            count += 1
    return count


def snapshot(layer_names: list[str], messages: list[dict[str, Any]]) -> dict[str, Any]:
    """A session snapshot: every layer of the composition, in order, suspended; the history
    layer holds ``messages``."""
    return {
        "schema_version": 1,
        "layers": [
            {
                "name": name,
                "lifecycle_state": "suspended",
                "runtime_state": {"messages": messages} if name == HISTORY_LAYER else {},
            }
            for name in layer_names
        ],
    }
