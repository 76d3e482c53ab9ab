"""Request bodies of the run API, validated as strictly as the real server validates them.

Unknown fields are rejected (``extra=forbid``) because a client that sends them has a bug worth
surfacing, and a body that the real server would refuse is refused here with the same 422:
a snapshot whose layers do not match the composition, and ``deferred_tool_results`` that do not
answer exactly the calls the snapshot's history is waiting for (stub_backend/history.py).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from stub_backend import history

__all__ = [
    "ASK_HUMAN",
    "ASK_HUMAN_LAYER_TYPE",
    "AskHumanResult",
    "CancelRequest",
    "Composition",
    "CreateRunRequest",
    "DeferredToolResults",
    "LayerSpec",
    "OnExit",
    "Strict",
    "validation_detail",
]

ASK_HUMAN = "ask_human"
ASK_HUMAN_LAYER_TYPE = "dify.ask_human"
IDENTIFIER = r"^[A-Za-z_][A-Za-z0-9_]*$"


class Strict(BaseModel):
    """A model that refuses unknown fields, like every model of the real server."""

    model_config = ConfigDict(extra="forbid")


class LayerSpec(Strict):
    """One layer of a composition."""

    name: str = Field(min_length=1)
    type: str = Field(min_length=1)
    deps: dict[str, str] = Field(default_factory=dict)
    metadata: dict[str, Any] = Field(default_factory=dict)
    config: Any = None


class Composition(Strict):
    """The layers a run is built from; names are the composition's logical identity."""

    schema_version: int = 1
    layers: list[LayerSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _names_unique_and_deps_resolvable(self) -> Composition:
        names = [layer.name for layer in self.layers]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"duplicate layer names: {duplicates}")
        known = set(names)
        for layer in self.layers:
            for dep_key, target in layer.deps.items():
                if target == layer.name or target not in known:
                    raise ValueError(
                        f"layer {layer.name!r}: dep {dep_key!r} names {target!r}, "
                        "which is not another layer of the composition"
                    )
        return self


class DeferredToolResults(Strict):
    """Results of the tool calls a previous run deferred to the caller (the real server's
    ``DeferredToolResultsPayload``): one JSON value per ``tool_call_id``, and metadata per
    call."""

    calls: dict[str, JsonValue] = Field(default_factory=dict)
    metadata: dict[str, dict[str, JsonValue]] = Field(default_factory=dict)


class AskHumanSelectedAction(Strict):
    """The action the person chose, as the ``dify.ask_human`` layer expects it back."""

    id: str = Field(pattern=IDENTIFIER)
    label: str = Field(min_length=1, pattern=r"\S")


class AskHumanResult(Strict):
    """The result of an ``ask_human`` call (the layer's ``AskHumanToolResult``)."""

    status: Literal["submitted", "timeout", "cancelled", "unavailable"]
    action: AskHumanSelectedAction | None = None
    values: dict[str, JsonValue] = Field(default_factory=dict)
    message: str | None = None
    rendered_content: str | None = None


_ASK_HUMAN_RESULT: TypeAdapter[AskHumanResult] = TypeAdapter(AskHumanResult)


class OnExit(Strict):
    """What the server does with each layer when the run ends."""

    default: str = "suspend"
    layers: dict[str, str] = Field(default_factory=dict)


class CreateRunRequest(Strict):
    """Body of ``POST /runs``."""

    composition: Composition
    session_snapshot: dict[str, Any] | None = None
    idempotency_key: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    deferred_tool_results: DeferredToolResults | None = None
    on_exit: OnExit = Field(default_factory=OnExit)

    @model_validator(mode="after")
    def _snapshot_matches_composition(self) -> CreateRunRequest:
        if self.session_snapshot is None:
            return self
        layers = self.session_snapshot.get("layers")
        if not isinstance(layers, list) or not all(
            isinstance(layer, dict) and isinstance(layer.get("name"), str) for layer in layers
        ):
            raise ValueError("session_snapshot.layers must be a list of objects with a name")
        snapshot_names = [layer["name"] for layer in layers]
        composition_names = [layer.name for layer in self.composition.layers]
        if snapshot_names != composition_names:
            raise ValueError(
                f"session_snapshot layers {snapshot_names} do not match the composition's "
                f"layers {composition_names}"
            )
        return self

    @model_validator(mode="after")
    def _deferred_results_answer_the_pending_calls(self) -> CreateRunRequest:
        """Results go with the calls the snapshot waits for, all of them and only them: the
        real server matches them against the call in its history and cannot run with a call
        left open."""
        pending = history.pending_calls(history.messages_of(self.session_snapshot))
        calls = self.deferred_tool_results.calls if self.deferred_tool_results else {}
        unknown = sorted(set(calls) - set(pending))
        if unknown:
            raise ValueError(
                f"deferred_tool_results.calls name tool calls that the session_snapshot is "
                f"not waiting for: {unknown}"
            )
        unanswered = [call_id for call_id in pending if call_id not in calls]
        if unanswered:
            raise ValueError(
                f"the session_snapshot waits for the results of tool calls {unanswered}; "
                "send them in deferred_tool_results.calls"
            )
        for call_id, result in calls.items():
            if pending[call_id].get("tool_name") != ASK_HUMAN:
                continue
            try:
                _ASK_HUMAN_RESULT.validate_python(result)
            except ValidationError as exc:
                problems = "; ".join(
                    f"{'.'.join(str(part) for part in error['loc']) or 'result'}: "
                    f"{error['msg']}"
                    for error in exc.errors()
                )
                raise ValueError(
                    f"deferred_tool_results.calls[{call_id!r}] is not an ask_human result "
                    f"({problems})"
                ) from None
        return self

    @property
    def ask_human_layer_type(self) -> str | None:
        """The type of the composition's ask-human layer, if it has one (a fork may rename the
        ``dify.`` prefix)."""
        for layer in self.composition.layers:
            if layer.type == ASK_HUMAN_LAYER_TYPE or layer.type.endswith(f".{ASK_HUMAN}"):
                return layer.type
        return None


class CancelRequest(Strict):
    """Body of ``POST /runs/{run_id}/cancel``."""

    reason: str | None = None
    message: str | None = None


def validation_detail(exc: ValidationError) -> list[Any]:
    """A validation error as the ``detail`` list of a 422 answer."""
    # exc.json() knows how to serialise the error contexts (which may hold exception objects).
    detail: list[Any] = json.loads(exc.json(include_url=False))
    return detail
