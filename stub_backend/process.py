"""The agent's process in a stub run: thinking, tool rounds and a question to the user.

Each helper appends the events the reference server sends for one piece of process, in the
shapes of ../shared/agent-protocol-frames/ (thinking.sse, tool_unknown.sse, ask_human.sse,
ask_human_resumed.sse). A run asks for them through its query, as the reference server was
driven in those captures:

- ``THINK`` in the query: a thinking part (start, deltas, end) before the answer;
- ``CALL_TOOL:lookup``: a tool round whose call is refused (``retry-prompt``), then the answer;
- ``CALL_TOOL:ask_human``: the ``ask_human`` call, deferred: the run succeeds with
  ``deferred_tool_call`` instead of ``output``, and its snapshot remembers the call;
- a run created with ``deferred_tool_results`` for that call resumes: the call's result
  (``tool-return`` with the submitted answer), then the answer
  ``Tool ask_human said: <the result as compact JSON>``.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

ASK_HUMAN = "ask_human"
REFUSAL = "Unknown tool name: '{name}'. No tools available."
QUESTION_ARGS = {"title": "Confirm", "question": "Please confirm: {query}",
                 "markdown": "", "fields": [{"name": "answer", "type": "text"}],
                 "actions": [{"id": "submit", "label": "Submit", "style": "primary"},
                             {"id": "cancel", "label": "Cancel", "style": "default"}],
                 "urgency": "normal"}

Append = Callable[..., Any]


def call_id_for(run_id: str) -> str:
    return f"call_{run_id[:12]}"


async def think(append: Append, pause: Callable[[], Awaitable[None]], text: str) -> None:
    """A thinking part: start with a line break, one delta per word, end with the whole."""
    append("pydantic_ai_event", {"index": 0, "part": {"content": "\n", "part_kind": "thinking"},
                                 "event_kind": "part_start"}, delta=None)
    whole = "\n"
    for word in text.split(" "):
        await pause()
        piece = word + " "
        whole += piece
        append("pydantic_ai_event", {"index": 0, "delta": {"content_delta": piece,
                                                           "part_delta_kind": "thinking"},
                                     "event_kind": "part_delta"}, delta=None)
    append("pydantic_ai_event", {"index": 0, "part": {"content": whole,
                                                      "part_kind": "thinking"},
                                 "event_kind": "part_end"}, delta=None)


def _tool_call_part(name: str, args: dict[str, Any], call_id: str) -> dict[str, Any]:
    return {"tool_name": name, "args": json.dumps(args), "tool_call_id": call_id,
            "part_kind": "tool-call"}


def refused_tool_round(append: Append, name: str, args: dict[str, Any], call_id: str) -> str:
    """A tool call the server refuses (no such tool); returns the refusal text."""
    part = _tool_call_part(name, args, call_id)
    append("pydantic_ai_event", {"index": 0, "part": part, "event_kind": "part_start"},
           delta=None)
    append("pydantic_ai_event", {"index": 0, "part": part, "event_kind": "part_end"},
           delta=None)
    append("pydantic_ai_event", {"part": part, "args_valid": False,
                                 "event_kind": "function_tool_call"}, delta=None)
    refusal = REFUSAL.format(name=name)
    append("pydantic_ai_event", {"part": {"content": refusal, "tool_name": name,
                                          "tool_call_id": call_id, "part_kind": "retry-prompt"},
                                 "content": None, "event_kind": "function_tool_result"},
           delta=None)
    return refusal


def ask(append: Append, query: str, call_id: str) -> dict[str, Any]:
    """The ask_human call as the model makes it; returns the deferred call for run_succeeded."""
    args = {**QUESTION_ARGS, "question": QUESTION_ARGS["question"].format(query=query)}
    part = _tool_call_part(ASK_HUMAN, {"question": args["question"]}, call_id)
    append("pydantic_ai_event", {"index": 0, "part": part, "event_kind": "part_start"},
           delta=None)
    append("pydantic_ai_event", {"tool_name": None, "tool_call_id": None,
                                 "event_kind": "final_result"}, delta=None)
    append("pydantic_ai_event", {"index": 0, "part": part, "event_kind": "part_end"},
           delta=None)
    append("pydantic_ai_event", {"part": part, "args_valid": True,
                                 "event_kind": "function_tool_call"}, delta=None)
    return {"tool_call_id": call_id, "tool_name": ASK_HUMAN, "args": args, "metadata": {}}


def resumed_call(append: Append, question: str, call_id: str, result: Any) -> None:
    """The start of a resumed run: the deferred call, then its result as a tool-return."""
    part = _tool_call_part(ASK_HUMAN, {"question": question}, call_id)
    append("pydantic_ai_event", {"part": part, "args_valid": None,
                                 "event_kind": "function_tool_call"}, delta=None)
    append("pydantic_ai_event", {"part": {"tool_name": ASK_HUMAN, "content": result,
                                          "tool_call_id": call_id, "outcome": "success",
                                          "part_kind": "tool-return"},
                                 "content": None, "event_kind": "function_tool_result"},
           delta=None)
