"""The control API's bodies and what it remembers per message: faults, overrides, a process.

The worker runs in another process and a test only knows the message it enqueued, so every
fault, override and scripted process is registered for a ``metadata.message_id`` with
``POST /_stub/messages/{message_id}`` (a ``MessageControl``) and kept as a ``Registration``
until the state is reset. Bodies are strict (``extra=forbid``): a misspelt key in a test's plan
is a 422, not a plan silently ignored.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, JsonValue, Tag, model_validator

from stub_backend.wire import ASK_HUMAN, IDENTIFIER, Strict

__all__ = [
    "AskHumanAction",
    "AskHumanArgs",
    "AskHumanStep",
    "CreateFault",
    "FailSpec",
    "MessageControl",
    "ProcessStep",
    "Registration",
    "StreamFault",
    "ThinkingStep",
    "ToolStep",
]


class CreateFault(Strict):
    """One scripted answer to ``POST /runs``."""

    status: int = Field(ge=100, le=599)
    body: Any = None


class StreamFault(Strict):
    """One scripted misbehaviour of an SSE connection; exactly one ``*_after`` is given."""

    drop_after: int | None = Field(default=None, ge=0)
    stall_after: int | None = Field(default=None, ge=0)
    stall_seconds: float | None = Field(default=None, ge=0)
    garbage_after: int | None = Field(default=None, ge=0)
    # Send ``frame`` (raw text, sent as is) after K frames, then go on normally: lets a test
    # put any malformed or hostile frame on the wire.
    inject_after: int | None = Field(default=None, ge=0)
    frame: str | None = None

    @model_validator(mode="after")
    def _exactly_one_kind(self) -> StreamFault:
        kinds = [self.drop_after, self.stall_after, self.garbage_after, self.inject_after]
        if sum(kind is not None for kind in kinds) != 1:
            raise ValueError(
                "give exactly one of drop_after, stall_after, garbage_after, inject_after")
        if self.stall_seconds is not None and self.stall_after is None:
            raise ValueError("stall_seconds only goes with stall_after")
        if (self.frame is None) != (self.inject_after is None):
            raise ValueError("frame and inject_after go together")
        return self


class FailSpec(Strict):
    """Make runs end with ``run_failed`` after some answer tokens (a run that asks, having no
    answer, fails in place of its deferred call)."""

    reason: str | None = None
    error: str = "injected failure"
    after_tokens: int = Field(default=0, ge=0)
    # How many runs of the message fail; None: every one. Lets a test see a retry succeed.
    times: int | None = Field(default=None, ge=1)


# The agent's process, step by step (stub_backend/process.py turns the steps into events) -----


class ThinkingStep(Strict):
    """``{"thinking": "text"}`` streams the text word by word; ``{"thinking": ["\\n", "a",
    " b"]}`` streams exactly those chunks (the first one in the ``part_start``)."""

    thinking: Annotated[str, Field(min_length=1)] | Annotated[list[str], Field(min_length=1)]


class ToolStep(Strict):
    """One tool round: the model calls ``tool`` with ``args``; the call returns ``result``
    (a ``tool-return``) or is ``refused`` with that text (a ``retry-prompt``). Then the model
    starts a new round."""

    tool: str = Field(min_length=1)
    args: dict[str, JsonValue] = Field(default_factory=dict)
    result: JsonValue = None
    refused: str | None = None
    tool_call_id: str | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _returns_or_is_refused(self) -> ToolStep:
        if ("result" in self.model_fields_set) == (self.refused is not None):
            raise ValueError("a tool step has exactly one of result and refused")
        if self.tool == ASK_HUMAN:
            raise ValueError("ask the user with an ask_human step, not a tool step")
        return self


class AskHumanAction(Strict):
    """A button the question offers."""

    id: str = Field(pattern=IDENTIFIER)
    label: str = Field(min_length=1, pattern=r"\S")
    style: Literal["default", "primary", "destructive"] = "default"


class AskHumanArgs(Strict):
    """The ``ask_human`` tool's arguments as the model passes them (the layer's
    ``AskHumanToolArgs``). ``fields`` are passed through as given; without ``actions`` the
    question offers one ``submit`` action, as the reference server's does."""

    title: str | None = None
    question: str = Field(min_length=1, pattern=r"\S")
    markdown: str | None = None
    fields: list[dict[str, JsonValue]] = Field(default_factory=list)
    actions: list[AskHumanAction] = Field(default_factory=list)
    urgency: Literal["normal", "high"] = "normal"

    @model_validator(mode="after")
    def _action_ids_unique(self) -> AskHumanArgs:
        ids = [action.id for action in self.actions]
        if len(ids) != len(set(ids)):
            raise ValueError(f"action ids must be unique: {ids}")
        return self


class AskHumanStep(Strict):
    """A question to the user: the run ends with the deferred ``ask_human`` call; the run that
    resumes it with the answer goes on with the steps after this one."""

    ask_human: AskHumanArgs
    tool_call_id: str | None = Field(default=None, min_length=1)


def _step_kind(value: Any) -> str | None:
    if isinstance(value, dict):
        return next((key for key in ("thinking", "tool", "ask_human") if key in value), None)
    return {ThinkingStep: "thinking", ToolStep: "tool", AskHumanStep: "ask_human"}.get(
        type(value))


ProcessStep = Annotated[
    Annotated[ThinkingStep, Tag("thinking")]
    | Annotated[ToolStep, Tag("tool")]
    | Annotated[AskHumanStep, Tag("ask_human")],
    Discriminator(
        _step_kind,
        custom_error_type="unknown_process_step",
        custom_error_message="a process step has one of the keys thinking, tool, ask_human",
    ),
]


class MessageControl(Strict):
    """Body of ``POST /_stub/messages/{message_id}``; keys given replace earlier values."""

    create: list[CreateFault] | None = None
    stream: list[StreamFault] | None = None
    fail: FailSpec | None = None
    output: Any = None
    token_delay: float | None = Field(default=None, ge=0)
    answer_tokens: int | None = Field(default=None, ge=0)
    # The message's whole process; null: back to the query's triggers (stub_backend/process.py).
    process: list[ProcessStep] | None = None


@dataclass
class Registration:
    """Faults and overrides registered for one message id."""

    create: deque[CreateFault] = field(default_factory=deque)
    stream: deque[StreamFault] = field(default_factory=deque)
    fail: FailSpec | None = None
    has_output: bool = False
    output: Any = None
    token_delay: float | None = None
    answer_tokens: int | None = None
    process: tuple[ThinkingStep | ToolStep | AskHumanStep, ...] | None = None

    def take_fail(self) -> FailSpec | None:
        """The failure the next run gets, counting down a limited ``times``."""
        fail = self.fail
        if fail is not None and fail.times is not None:
            remaining = fail.times - 1
            self.fail = fail.model_copy(update={"times": remaining}) if remaining else None
        return fail

    def update(self, body: MessageControl) -> None:
        given = body.model_fields_set
        if "create" in given:
            self.create = deque(body.create or [])
        if "stream" in given:
            self.stream = deque(body.stream or [])
        if "fail" in given:
            self.fail = body.fail
        if "output" in given:
            self.has_output = True
            self.output = body.output
        if "token_delay" in given:
            self.token_delay = body.token_delay
        if "answer_tokens" in given:
            self.answer_tokens = body.answer_tokens
        if "process" in given:
            self.process = None if body.process is None else tuple(body.process)
