"""The turn payload: the only thing a web tier sends, validated before anything else happens.

The payload is plain JSON so that a producer can enqueue with ``send_task`` and never import this
package. It carries ids, the user's query, optional inputs and the agent settings a turn may pick
(system prompt, model, model parameters) inside the limits of the worker's settings. It never
carries credentials: those come from the worker's own settings, so a compromised web tier cannot
point the worker at another model account.

Validation is strict (unknown fields, wrong types, empty or oversize values are errors) because a
payload the worker half-understands would cost a model call and could not be fixed by a retry.

Text is checked as text: every string, ``inputs`` keys and values at any depth included, must be
valid Unicode (no lone surrogates, which no encoder can write: the turn's events, its log lines
and the database would all fail on them), without NUL (PostgreSQL refuses it in text and JSON)
or other control characters than tab, line feed and carriage return. ``inputs`` nests at most
``max_inputs_depth`` levels. An error message names where a problem is, never more than a short
escaped excerpt of the value or key that caused it (``worker.logs.excerpt``), so a hostile
payload cannot make its refusal large or forge lines where it is shown.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticCustomError

from config.settings import Settings
from worker.errors import InvalidTurnPayload
from worker.logs import excerpt
from worker.ownership import owner_fingerprint

PAYLOAD_SCHEMA_VERSION = 1
# How much of a refusal's reasons an error event, a log line or a task result carries.
MAX_ERROR_CHARS = 1000

# Lone surrogates, NUL and the C0 controls other than tab, line feed and carriage return, DEL.
_FORBIDDEN_IN_TEXT = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")


def _text_problem(value: str) -> str | None:
    found = _FORBIDDEN_IN_TEXT.search(value)
    if found is None:
        return None
    code = ord(found.group())
    what = "a lone surrogate" if 0xD800 <= code <= 0xDFFF else "a control character"
    return f"contains {what} (U+{code:04X}) at position {found.start()}"


def _checked_text(value: str) -> str:
    problem = _text_problem(value)
    if problem is not None:
        raise PydanticCustomError("text", problem)
    return value


Text = Annotated[str, AfterValidator(_checked_text)]

# Ids become Redis channel names, database keys and log fields: a conservative alphabet keeps
# them safe everywhere (UUIDs, ULIDs and slug-like ids all fit).
Identifier = Annotated[
    str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$", strict=True)
]
ModelName = Annotated[
    str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:/@-]{0,127}$", strict=True)
]


_DEFAULT_LIMITS = Settings()


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def _limits(info: ValidationInfo) -> Settings:
    """The worker's limits, passed in the validation context (defaults when validated bare)."""
    settings = (info.context or {}).get("settings")
    return settings if isinstance(settings, Settings) else _DEFAULT_LIMITS


def _over_limit(message: str) -> PydanticCustomError:
    return PydanticCustomError("limit", message)


class ModelParameters(_Strict):
    """The model parameters a turn may set; anything else is the operator's business."""

    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    stop: list[Annotated[Text, StringConstraints(min_length=1, max_length=64)]] | None = Field(
        None, max_length=4
    )

    @field_validator("max_tokens")
    @classmethod
    def _within_output_limit(cls, value: int | None, info: ValidationInfo) -> int | None:
        ceiling = _limits(info).max_output_tokens
        if value is not None and value > ceiling:
            raise _over_limit(f"more than {ceiling}")
        return value

    def as_model_settings(self) -> dict[str, Any] | None:
        chosen = self.model_dump(exclude_none=True)
        return chosen or None


class AgentOptions(_Strict):
    system_prompt: Text | None = None
    model: ModelName | None = None
    parameters: ModelParameters = ModelParameters()
    # Whether the turn's clients see the agent's thinking and its tool calls as steps; None
    # takes the worker's settings (AGENT_TURN_EXPOSE_THINKING, AGENT_TURN_EXPOSE_TOOL_CALLS).
    include_thinking: bool | None = None
    include_tool_calls: bool | None = None

    @field_validator("system_prompt")
    @classmethod
    def _prompt_within_limit(cls, value: str | None, info: ValidationInfo) -> str | None:
        ceiling = _limits(info).max_system_prompt_chars
        if value is not None and len(value) > ceiling:
            raise _over_limit(f"longer than {ceiling} characters")
        return value

    @field_validator("model")
    @classmethod
    def _model_allowed(cls, value: str | None, info: ValidationInfo) -> str | None:
        allowed = _limits(info).allowed_models
        if value is not None and allowed and value not in allowed:
            raise _over_limit(f"{value!r} is not one of the allowed models")
        return value


class TurnPayload(_Strict):
    """One chat turn, as enqueued by the web tier."""

    schema_version: Literal[1] = PAYLOAD_SCHEMA_VERSION
    tenant_id: Identifier
    app_id: Identifier
    user_id: Identifier
    conversation_id: Identifier
    message_id: Identifier
    user_from: Literal["account", "end-user"] = "end-user"
    invoke_from: Literal["service-api", "web-app", "explore", "debugger"] = "service-api"
    query: Text
    inputs: dict[str, Any] = Field(default_factory=dict)
    agent: AgentOptions = AgentOptions()

    @property
    def owner(self) -> str:
        """The fingerprint of the turn's owner (worker/ownership.py)."""
        return owner_fingerprint(self.tenant_id, self.app_id, self.user_id)

    @field_validator("schema_version", mode="before")
    @classmethod
    def _version_is_an_integer(cls, value: Any) -> Any:
        # ``True == 1`` in Python, and a Literal compares by equality: strict means no bool.
        if isinstance(value, bool):
            raise PydanticCustomError("int_type", "Input should be a valid integer, not a bool")
        return value

    @field_validator("query")
    @classmethod
    def _query_present_and_within_limit(cls, value: str, info: ValidationInfo) -> str:
        ceiling = _limits(info).max_query_chars
        if not value.strip():
            raise _over_limit("must not be empty")
        if len(value) > ceiling:
            raise _over_limit(f"longer than {ceiling} characters")
        return value

    @field_validator("inputs")
    @classmethod
    def _inputs_within_limit(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        limits = _limits(info)
        _check_json_tree(value, limits.max_inputs_depth)
        ceiling = limits.max_inputs_bytes
        size = len(json.dumps(value, ensure_ascii=False).encode())
        if size > ceiling:
            raise _over_limit(f"{size} bytes, more than {ceiling}")
        return value


def _check_json_tree(value: Any, max_depth: int) -> None:
    """Every string in a JSON value (keys too) is text; containers nest at most ``max_depth``.

    Walked with an explicit stack: a recursive walk of a hostile value is a ``RecursionError``
    waiting to happen.
    """
    pending: list[tuple[Any, int, str]] = [(value, 1, "")]
    while pending:
        node, depth, where = pending.pop()
        if isinstance(node, dict | list) and depth > max_depth:
            raise _over_limit(f"nested deeper than {max_depth} levels at {where or 'the top'}")
        if isinstance(node, dict):
            for key, item in node.items():
                path = f"{where}.{excerpt(key, 40)}" if where else excerpt(key, 40)
                problem = _text_problem(key) if isinstance(key, str) else None
                if problem is not None:
                    raise PydanticCustomError("text", f"key {path}: {problem}")
                pending.append((item, depth + 1, path))
        elif isinstance(node, list):
            pending.extend((item, depth + 1, f"{where}[{index}]")
                           for index, item in enumerate(node))
        elif isinstance(node, str):
            problem = _text_problem(node)
            if problem is not None:
                raise PydanticCustomError("text", f"value at {where}: {problem}")


def _describe(exc: ValidationError) -> str:
    """Every problem, named by where it is; keys from the payload shown as bounded excerpts."""
    described = []
    for error in exc.errors(include_url=False):
        where = ".".join(excerpt(part, 40) if isinstance(part, str) else str(part)
                         for part in error["loc"]) or "turn"
        described.append(f"{where}: {excerpt(error['msg'], 200)}")
    return excerpt("; ".join(described), MAX_ERROR_CHARS)


def parse_turn(raw: Any, settings: Settings) -> TurnPayload:
    """Validate a raw payload; raise ``InvalidTurnPayload`` naming every problem at once.

    The message id is attached to the error whenever it is itself valid, so the caller can still
    tell the waiting client why its turn was refused.
    """
    if not isinstance(raw, dict):
        raise InvalidTurnPayload(f"turn payload must be a JSON object, not {type(raw).__name__}")
    try:
        return TurnPayload.model_validate(raw, context={"settings": settings})
    except ValidationError as exc:
        raise InvalidTurnPayload(
            "invalid turn payload: " + _describe(exc),
            message_id=valid_message_id(raw),
        ) from None


def valid_message_id(raw: Any) -> str | None:
    """The payload's message id if it is a usable one, else None."""
    if not isinstance(raw, dict):
        return None
    candidate = raw.get("message_id")
    try:
        return _MessageIdOnly.model_validate({"message_id": candidate}).message_id
    except ValidationError:
        return None


class HumanAnswerFields(_Strict):
    """What the user sends back for a question: the call it answers, the action they chose and
    the values they gave. A class of its own so that a client's body (the gateway's
    ``POST /v1/turns/{message_id}/human-input``) is checked for shape before anything is
    looked up, with the same rules as the task's payload."""

    tool_call_id: Annotated[Text, StringConstraints(min_length=1, max_length=128)]
    action: Annotated[Text, StringConstraints(min_length=1, max_length=64)]
    values: dict[str, Any] = Field(default_factory=dict)

    @field_validator("values")
    @classmethod
    def _values_are_text(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        _check_json_tree(value, 4)
        ceiling = _limits(info).max_human_input_bytes
        size = len(json.dumps(value, ensure_ascii=False).encode())
        if size > ceiling:
            raise _over_limit(f"{size} bytes, more than {ceiling}")
        return value


class HumanInputRequest(HumanAnswerFields):
    """The user's answer to a question, as ``submit_human_input`` enqueues it.

    It names the owner like a turn does: the worker hands a question's answer only to the
    owner of the message that asked it.
    """

    schema_version: Literal[1] = PAYLOAD_SCHEMA_VERSION
    tenant_id: Identifier
    app_id: Identifier
    user_id: Identifier
    message_id: Identifier


def parse_human_input(raw: Any, settings: Settings) -> HumanInputRequest:
    """Validate an answer's payload; ``InvalidTurnPayload`` naming every problem at once."""
    if not isinstance(raw, dict):
        raise InvalidTurnPayload(f"human input must be a JSON object, not {type(raw).__name__}")
    try:
        return HumanInputRequest.model_validate(raw, context={"settings": settings})
    except ValidationError as exc:
        raise InvalidTurnPayload("invalid human input: " + _describe(exc),
                                 message_id=valid_message_id(raw)) from None


def parse_human_answer(raw: Any, settings: Settings) -> HumanAnswerFields:
    """Validate the user's part of an answer (no ids); ``InvalidTurnPayload`` naming every
    problem at once: unknown fields, wrong types, oversize values."""
    if not isinstance(raw, dict):
        raise InvalidTurnPayload(f"an answer must be a JSON object, not {type(raw).__name__}")
    try:
        return HumanAnswerFields.model_validate(raw, context={"settings": settings})
    except ValidationError as exc:
        raise InvalidTurnPayload("invalid human input: " + _describe(exc)) from None


def valid_identifier(candidate: Any) -> str | None:
    """``candidate`` if it is a usable id (worker/payload.py's alphabet), else None."""
    try:
        return _IdOnly.model_validate({"id": candidate}).id
    except ValidationError:
        return None


class _MessageIdOnly(_Strict):
    message_id: Identifier


class _IdOnly(_Strict):
    id: Identifier
