"""What one stub run says: its plan, fixed at create time, and the events it emits, in order.

Pure: no I/O and no clock but the timestamps and latency a real server would stamp, so the
scripts here can be read (and tested) apart from the routes, the run log and SSE framing.
``stub_backend.runs.produce`` paces the events onto a run's log.

The answer
    ``[turn N] You said: <query>.`` where N counts the user entries of the snapshot's history
    plus one (stub_backend/history.py), padded with ``lorem ipsum …`` words to
    ``answer_tokens``, streamed one word (with its leading space) per ``token_delay``. A run
    that resumes a deferred call answers as the reference server's model did:
    ``Tool <tool name> said: <the call's result as compact JSON>``. An ``output`` override
    replaces ``run_succeeded.output`` but not the streamed text.

The agent's process, before the answer
    A plain run has one thinking ``part_start`` ("Thinking about it.", index 0, no deltas, no
    ``part_end``) and its text part at index 1. A run with a process emits that process
    instead, in the shapes of ../shared/agent-protocol-frames/, and no such part. The process
    of a message is its registered ``process`` (stub_backend/control.py) or, without one, what
    its query asks for, as the reference server was driven in the captures:

    - ``THINK`` anywhere: a thought first, ``"\\nCounting user messages: N.\\n"``, streamed as
      the capture's chunks ``"\\n"`` (in the ``part_start``), ``"Counting user messages: "``,
      ``"N."``, ``"\\n"``;
    - each ``CALL_TOOL:<name>``, in order: a tool round with args
      ``{"question": "Please confirm: <query>"}`` that is refused
      (``Unknown tool name: '<name>'. No tools available.``, a ``retry-prompt``): the
      reference server has no tools;
    - ``CALL_TOOL:ask_human``: the question ``Please confirm: <query>`` (args as the model
      passes them: only ``question``), deferred.

    The stub asks whether or not the composition has a ``dify.ask_human`` layer (the reference
    server, without one, has no such tool and would refuse the call): the worker's default
    template has none, and its tests ask all the same. The deferred call's
    ``metadata.layer_type`` is the layer's type when there is one, else ``dify.ask_human``.

Event sequences (``pai:`` is a ``pydantic_ai_event``; ``agent_message_delta`` is null on all
but the text part's ``part_start`` and ``part_delta``)

    thought      pai:part_start thinking (first chunk), pai:part_delta thinking (each further
                 chunk, paced like answer tokens), pai:part_end thinking (the whole thought,
                 ``next_part_kind`` of what follows)
    tool round   pai:part_start tool-call, pai:part_end tool-call, pai:function_tool_call
                 (``args_valid`` false when refused, true otherwise), pai:function_tool_result
                 (``tool-return`` with the result, or ``retry-prompt`` with the refusal); the
                 next model round numbers its parts from 0 again
    question     pai:part_start tool-call ask_human, pai:final_result, pai:part_end tool-call,
                 pai:function_tool_call (``args_valid`` true), then ``run_succeeded`` with
                 ``session_snapshot``, ``deferred_tool_call`` ``{tool_call_id, tool_name:
                 "ask_human", args: {title, question, markdown, fields, actions, urgency},
                 metadata: {layer_type, tool_name, schema_version}}`` and ``usage``, no
                 ``output``; the snapshot's history ends with the unanswered call
    resumed call pai:function_tool_call (``args_valid`` null), pai:function_tool_result
                 ``tool-return`` whose content is the result sent in ``deferred_tool_results``;
                 the run then goes on with the process steps after the question it answers
    answer       pai:part_start text (first token), pai:final_result, pai:part_delta text
                 (each further token), pai:part_end text (the whole answer), ``run_succeeded``
                 with ``session_snapshot``, ``output`` and ``usage``

A run that resumes adds no user entry to the history (it continues the turn that asked). Tool
call ids are ``call_<first 8 of the run id>_<n>``, n counting the run's calls from 1, unless a
step gives its own.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from stub_backend import history
from stub_backend.control import (
    AskHumanArgs,
    AskHumanStep,
    FailSpec,
    Registration,
    ThinkingStep,
    ToolStep,
)
from stub_backend.settings import StubSettings
from stub_backend.wire import ASK_HUMAN, ASK_HUMAN_LAYER_TYPE, CreateRunRequest

__all__ = [
    "Emit",
    "Question",
    "Resumed",
    "RunPlan",
    "Thought",
    "ToolRound",
    "answer_tokens_for",
    "events",
    "plan_run",
    "steps_from_query",
]

THINKING_TEXT = "Thinking about it."
PROVIDER_NAME = "DifyPlugin/langgenius/openai"
PAD_WORDS = ("lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit")
REFUSAL = "Unknown tool name: '{name}'. No tools available."
DEFAULT_ACTION = {"id": "submit", "label": "Submit", "style": "primary"}
_TOKEN_RE = re.compile(r"\s*\S+")
# Words with their leading whitespace; whitespace at the very end is a chunk of its own.
_CHUNK_RE = re.compile(r"\s*\S+|\s+$")
_CALL_TOOL_RE = re.compile(r"CALL_TOOL:([A-Za-z_][A-Za-z0-9_]*)")

Step = ThinkingStep | ToolStep | AskHumanStep


# --------------------------------------------------------------------------------------------
# The plan: everything a run will say, fixed when it is created


@dataclass(frozen=True)
class Thought:
    """A thinking part, as the chunks it streams in."""

    chunks: tuple[str, ...]

    @property
    def text(self) -> str:
        return "".join(self.chunks)


@dataclass(frozen=True)
class ToolRound:
    """A tool call and its result (``refused`` set: a retry-prompt instead)."""

    tool_call_id: str
    tool_name: str
    args: str
    result: Any = None
    refused: str | None = None


@dataclass(frozen=True)
class Question:
    """The deferred ``ask_human`` call: ``model_args`` as the model made it (JSON text),
    ``args`` as the layer completes them."""

    tool_call_id: str
    model_args: str
    args: dict[str, Any]
    metadata: dict[str, Any]


@dataclass(frozen=True)
class Resumed:
    """A deferred call that this run answers with ``result``."""

    tool_call_id: str
    tool_name: str
    args: str
    result: Any


PlannedStep = Thought | ToolRound | Question


@dataclass(frozen=True)
class RunPlan:
    """Everything a producer needs, fixed at create time so later registrations don't race."""

    query: str
    history: list[dict[str, Any]]
    tokens: list[str]
    token_delay: float
    fail: FailSpec | None
    has_output: bool
    output: Any
    layer_names: list[str]
    steps: tuple[PlannedStep, ...] = ()
    resumed: tuple[Resumed, ...] = ()
    # The plain run's one thinking part_start; a run with a process has the process instead.
    default_thinking: bool = True

    @property
    def new_turn(self) -> bool:
        """A resumed run continues the turn that asked; any other run starts a turn."""
        return not self.resumed


def answer_tokens_for(query: str, messages: list[dict[str, Any]], pad_to: int) -> list[str]:
    """The deterministic answer of a new turn, split into words that carry their leading
    space."""
    return _padded(f"[turn {history.turns_in(messages) + 1}] You said: {query}.", pad_to)


def _padded(text: str, pad_to: int) -> list[str]:
    tokens = _TOKEN_RE.findall(text)
    pad_index = 0
    while len(tokens) < pad_to:
        tokens.append(" " + PAD_WORDS[pad_index % len(PAD_WORDS)])
        pad_index += 1
    return tokens


def compact_json(value: Any) -> str:
    """A tool result as the reference server's model quoted it: JSON without spaces."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def steps_from_query(query: str, turn: int) -> list[Step]:
    """The process a query asks for (``THINK``, ``CALL_TOOL:<name>``), in order."""
    steps: list[Step] = []
    if "THINK" in query:
        steps.append(ThinkingStep(thinking=["\n", "Counting user messages: ", f"{turn}.", "\n"]))
    question = f"Please confirm: {query}"
    for match in _CALL_TOOL_RE.finditer(query):
        name = match.group(1)
        if name == ASK_HUMAN:
            steps.append(AskHumanStep(ask_human=AskHumanArgs(question=question)))
        else:
            steps.append(ToolStep(tool=name, args={"question": question},
                                  refused=REFUSAL.format(name=name)))
    return steps


def _steps_of_this_run(process: Sequence[Step], questions_answered: int) -> list[Step]:
    """The steps after the questions already answered in this turn, through the next one: a
    question ends its run, and the run that resumes it goes on from there."""
    start = 0
    if questions_answered:
        seen = 0
        start = len(process)
        for position, step in enumerate(process):
            if isinstance(step, AskHumanStep):
                seen += 1
                if seen == questions_answered:
                    start = position + 1
                    break
    steps: list[Step] = []
    for step in process[start:]:
        steps.append(step)
        if isinstance(step, AskHumanStep):
            break
    return steps


def _chunks(thinking: str | list[str]) -> tuple[str, ...]:
    if isinstance(thinking, list):
        return tuple(thinking)
    return tuple(_CHUNK_RE.findall(thinking)) or (thinking,)


def _resolve(steps: list[Step], run_id: str, ask_layer_type: str) -> tuple[PlannedStep, ...]:
    planned: list[PlannedStep] = []
    calls = 0

    def call_id(given: str | None) -> str:
        nonlocal calls
        calls += 1
        return given or f"call_{run_id[:8]}_{calls}"

    for step in steps:
        if isinstance(step, ThinkingStep):
            planned.append(Thought(_chunks(step.thinking)))
        elif isinstance(step, ToolStep):
            planned.append(ToolRound(call_id(step.tool_call_id), step.tool, json.dumps(step.args),
                                     result=step.result, refused=step.refused))
        else:
            args = step.ask_human.model_dump(mode="json")
            if not args["actions"]:
                args["actions"] = [dict(DEFAULT_ACTION)]
            planned.append(Question(
                tool_call_id=call_id(step.tool_call_id),
                model_args=json.dumps(step.ask_human.model_dump(mode="json", exclude_unset=True)),
                args=args,
                metadata={"layer_type": ask_layer_type, "tool_name": ASK_HUMAN,
                          "schema_version": 1},
            ))
    return tuple(planned)


def _query_of(request: CreateRunRequest) -> str:
    for layer in request.composition.layers:
        if layer.type.endswith("prompt"):
            config = layer.config if isinstance(layer.config, dict) else {}
            user = config.get("user")
            return user if isinstance(user, str) else ("" if user is None else str(user))
    return ""


def plan_run(run_id: str, request: CreateRunRequest, settings: StubSettings,
             registration: Registration | None) -> RunPlan:
    """What run ``run_id`` will say, from its request and the message's registration.

    ``request`` is valid (stub_backend/wire.py): its ``deferred_tool_results`` answer exactly
    the calls its snapshot waits for.
    """
    token_delay = settings.token_delay
    pad_to = settings.answer_tokens
    if registration is not None:
        if registration.token_delay is not None:
            token_delay = registration.token_delay
        if registration.answer_tokens is not None:
            pad_to = registration.answer_tokens
    query = _query_of(request)
    messages = history.messages_of(request.session_snapshot)
    results = request.deferred_tool_results.calls if request.deferred_tool_results else {}
    resumed = tuple(
        Resumed(call_id, str(call.get("tool_name", "")), str(call.get("args", "{}")),
                results[call_id])
        for call_id, call in history.pending_calls(messages).items()
        if call_id in results
    )
    registered = registration.process if registration is not None else None
    turn = history.turns_in(messages) + (0 if resumed else 1)
    process = registered if registered is not None else steps_from_query(query, turn)
    answered = 0
    if resumed:
        answered = history.answered_in_this_turn(messages, ASK_HUMAN) + sum(
            1 for call in resumed if call.tool_name == ASK_HUMAN)
    steps = _resolve(_steps_of_this_run(process, answered), run_id,
                     request.ask_human_layer_type or ASK_HUMAN_LAYER_TYPE)
    if resumed:
        last = resumed[-1]
        tokens = _padded(f"Tool {last.tool_name} said: {compact_json(last.result)}", pad_to)
    else:
        tokens = answer_tokens_for(query, messages, pad_to)
    return RunPlan(
        query=query,
        history=messages,
        tokens=tokens,
        token_delay=token_delay,
        fail=registration.take_fail() if registration else None,
        has_output=registration.has_output if registration else False,
        output=registration.output if registration else None,
        layer_names=[layer.name for layer in request.composition.layers],
        steps=steps,
        resumed=resumed,
        default_thinking=registered is None and not steps and not resumed,
    )


# --------------------------------------------------------------------------------------------
# The events


@dataclass(frozen=True)
class Emit:
    """One event to append; ``paced`` ones are due one ``token_delay`` after the previous
    paced one (answer tokens and thought chunks), the others at once."""

    type: str
    data: dict[str, Any]
    delta: str | None = None
    paced: bool = False


def _pai(data: dict[str, Any], *, delta: str | None = None, paced: bool = False) -> Emit:
    return Emit("pydantic_ai_event", data, delta=delta, paced=paced)


def _now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _thinking_part(content: str) -> dict[str, Any]:
    return {"content": content, "id": None, "signature": None, "provider_name": PROVIDER_NAME,
            "provider_details": None, "part_kind": "thinking"}


def _call_part(tool_name: str, args: str, tool_call_id: str) -> dict[str, Any]:
    return {"tool_name": tool_name, "args": args, "tool_call_id": tool_call_id,
            "tool_kind": None, "id": None, "provider_name": PROVIDER_NAME,
            "provider_details": None, "part_kind": "tool-call"}


def _tool_return(tool_name: str, content: Any, tool_call_id: str) -> Emit:
    return _pai({"part": {"tool_name": tool_name, "content": content,
                          "tool_call_id": tool_call_id, "tool_kind": None, "metadata": None,
                          "timestamp": _now_iso(), "outcome": "success",
                          "part_kind": "tool-return", "content_file_digests": []},
                 "content": None, "event_kind": "function_tool_result"})


def _retry_prompt(tool_name: str, refusal: str, tool_call_id: str) -> Emit:
    return _pai({"part": {"content": refusal, "tool_name": tool_name,
                          "tool_call_id": tool_call_id, "timestamp": _now_iso(),
                          "part_kind": "retry-prompt"},
                 "content": None, "event_kind": "function_tool_result"})


FINAL_RESULT = {"tool_name": None, "tool_call_id": None, "event_kind": "final_result"}


def _part_kind(step: PlannedStep | None) -> str:
    if step is None:
        return "text"
    return "thinking" if isinstance(step, Thought) else "tool-call"


def _thought(thought: Thought, index: int, previous: str | None, following: str
             ) -> Iterator[Emit]:
    first, *rest = thought.chunks
    yield _pai({"index": index, "part": _thinking_part(first), "previous_part_kind": previous,
                "event_kind": "part_start"}, paced=True)
    for chunk in rest:
        yield _pai({"index": index,
                    "delta": {"content_delta": chunk, "signature_delta": None,
                              "provider_name": None, "provider_details": None,
                              "part_delta_kind": "thinking"},
                    "event_kind": "part_delta"}, paced=True)
    yield _pai({"index": index, "part": _thinking_part(thought.text),
                "next_part_kind": following, "event_kind": "part_end"})


def _tool_round(call: ToolRound, index: int, previous: str | None) -> Iterator[Emit]:
    part = _call_part(call.tool_name, call.args, call.tool_call_id)
    yield _pai({"index": index, "part": part, "previous_part_kind": previous,
                "event_kind": "part_start"})
    yield _pai({"index": index, "part": part, "next_part_kind": None, "event_kind": "part_end"})
    yield _pai({"part": part, "args_valid": call.refused is None,
                "event_kind": "function_tool_call"})
    if call.refused is not None:
        yield _retry_prompt(call.tool_name, call.refused, call.tool_call_id)
    else:
        yield _tool_return(call.tool_name, call.result, call.tool_call_id)


def _question(question: Question, index: int, previous: str | None) -> Iterator[Emit]:
    part = _call_part(ASK_HUMAN, question.model_args, question.tool_call_id)
    yield _pai({"index": index, "part": part, "previous_part_kind": previous,
                "event_kind": "part_start"})
    yield _pai(dict(FINAL_RESULT))
    yield _pai({"index": index, "part": part, "next_part_kind": None, "event_kind": "part_end"})
    yield _pai({"part": part, "args_valid": True, "event_kind": "function_tool_call"})


@dataclass
class _Usage:
    """Token counts of a run, rough but deterministic."""

    plan: RunPlan
    started: float = field(default_factory=time.monotonic)
    completion_tokens: int = 0

    def as_json(self) -> dict[str, Any]:
        history_words = sum(len(str(m.get("content", "")).split()) for m in self.plan.history)
        prompt_tokens = 10 + len(self.plan.query.split()) + history_words
        prompt_price = Decimal(prompt_tokens) * Decimal("0.0000025")
        completion_price = Decimal(self.completion_tokens) * Decimal("0.0000100")
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": prompt_tokens + self.completion_tokens,
            "prompt_price": str(prompt_price),
            "completion_price": str(completion_price),
            "total_price": str(prompt_price + completion_price),
            "currency": "USD",
            "latency": round(time.monotonic() - self.started, 6),
        }


def events(plan: RunPlan) -> Iterator[Emit]:
    """Every event of the run, in order, ending with exactly one terminal event."""
    usage = _Usage(plan)
    messages = [*plan.history, *([history.user(plan.query)] if plan.new_turn else [])]
    yield Emit("run_started", {})
    for call in plan.resumed:
        yield _pai({"part": _call_part(call.tool_name, call.args, call.tool_call_id),
                    "args_valid": None, "event_kind": "function_tool_call"})
        yield _tool_return(call.tool_name, call.result, call.tool_call_id)
        messages.append(history.tool_return(call.tool_call_id, call.tool_name, call.result))
    index, previous = 0, None
    if plan.default_thinking:
        yield _pai({"index": 0, "part": {"part_kind": "thinking", "content": THINKING_TEXT},
                    "event_kind": "part_start"})
        index = 1
    for position, step in enumerate(plan.steps):
        following = plan.steps[position + 1] if position + 1 < len(plan.steps) else None
        if isinstance(step, Thought):
            yield from _thought(step, index, previous, _part_kind(following))
            usage.completion_tokens += len(step.chunks)
            messages.append(history.thinking(step.text))
            index, previous = index + 1, "thinking"
        elif isinstance(step, ToolRound):
            yield from _tool_round(step, index, previous)
            usage.completion_tokens += 1
            messages.append(history.tool_call(step.tool_call_id, step.tool_name, step.args))
            messages.append(
                history.retry_prompt(step.tool_call_id, step.tool_name, step.refused)
                if step.refused is not None
                else history.tool_return(step.tool_call_id, step.tool_name, step.result))
            index, previous = 0, None  # the next model round numbers its parts from 0
        else:
            yield from _question(step, index, previous)
            usage.completion_tokens += 1
            if plan.fail is not None:
                yield Emit("run_failed", {"error": plan.fail.error, "reason": plan.fail.reason})
                return
            messages.append(history.tool_call(step.tool_call_id, ASK_HUMAN, step.model_args))
            yield Emit("run_succeeded", {
                "session_snapshot": history.snapshot(plan.layer_names, messages),
                "deferred_tool_call": {"tool_call_id": step.tool_call_id,
                                       "tool_name": ASK_HUMAN, "args": step.args,
                                       "metadata": step.metadata},
                "usage": usage.as_json(),
            })
            return
    yield from _answer(plan, index, messages, usage)


def _answer(plan: RunPlan, index: int, messages: list[dict[str, Any]], usage: _Usage
            ) -> Iterator[Emit]:
    fail_after = plan.fail.after_tokens if plan.fail is not None else None
    for position, token in enumerate(plan.tokens):
        if fail_after is not None and position >= fail_after:
            break
        if position == 0:
            yield _pai({"index": index, "part": {"part_kind": "text", "content": token},
                        "event_kind": "part_start"}, delta=token, paced=True)
            yield _pai(dict(FINAL_RESULT))
        else:
            yield _pai({"index": index,
                        "delta": {"part_delta_kind": "text", "content_delta": token},
                        "event_kind": "part_delta"}, delta=token, paced=True)
    if plan.fail is not None:
        yield Emit("run_failed", {"error": plan.fail.error, "reason": plan.fail.reason})
        return
    answer = "".join(plan.tokens)
    usage.completion_tokens += len(plan.tokens)
    yield _pai({"index": index, "part": {"part_kind": "text", "content": answer},
                "event_kind": "part_end"})
    messages.append(history.assistant(answer))
    yield Emit("run_succeeded", {
        "session_snapshot": history.snapshot(plan.layer_names, messages),
        "output": plan.output if plan.has_output else answer,
        "usage": usage.as_json(),
    })
