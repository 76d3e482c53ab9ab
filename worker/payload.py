"""The turn payload: the only thing a web tier sends, validated before anything else happens.

The payload is plain JSON so that a producer can enqueue with ``send_task`` and never import this
package. It carries ids, the user's query, optional inputs and the agent settings a turn may pick
(system prompt, model, model parameters) inside the limits of the worker's settings. It never
carries credentials: those come from the worker's own settings, so a compromised web tier cannot
point the worker at another model account.

Validation is strict (unknown fields, wrong types, empty or oversize values are errors) because a
payload the worker half-understands would cost a model call and could not be fixed by a retry.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import (
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

PAYLOAD_SCHEMA_VERSION = 1

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
    stop: list[Annotated[str, StringConstraints(min_length=1, max_length=64)]] | None = Field(
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
    system_prompt: str | None = None
    model: ModelName | None = None
    parameters: ModelParameters = ModelParameters()

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
    query: str
    inputs: dict[str, Any] = Field(default_factory=dict)
    agent: AgentOptions = AgentOptions()

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
        ceiling = _limits(info).max_inputs_bytes
        size = len(json.dumps(value, ensure_ascii=False).encode())
        if size > ceiling:
            raise _over_limit(f"{size} bytes, more than {ceiling}")
        return value


def _describe(exc: ValidationError) -> list[str]:
    described = []
    for error in exc.errors(include_url=False):
        where = ".".join(str(part) for part in error["loc"]) or "turn"
        described.append(f"{where}: {error['msg']}")
    return described


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
            "invalid turn payload: " + "; ".join(_describe(exc)),
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


class _MessageIdOnly(_Strict):
    message_id: Identifier
