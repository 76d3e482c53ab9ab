"""The run request: a composition template filled with one turn's values, plus its snapshot.

Which layers a run holds (names, type ids, configs) differs between dify-agent deployments, so
the composition is not code but a JSON template an operator can replace
(``AGENT_TURN_COMPOSITION_TEMPLATE``). Placeholders are ``{{name}}``:

- a string that is exactly one placeholder is replaced by the value itself, whatever its JSON
  type (so ``"{{model_credentials}}"`` becomes an object and ``"{{model_settings}}"`` may become
  null);
- a placeholder inside a longer string is replaced by text, so only text values may go there.

The template is checked once, at start-up, so that a broken template stops the worker with a clear
message instead of failing every turn. The layer names double as the snapshot's fingerprint: the
backend only accepts a snapshot sent back with the same layers in the same order, so a snapshot
taken under another template is not sent.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from config.settings import Settings
from worker.payload import TurnPayload

PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
TEXT_PLACEHOLDERS = frozenset({
    "tenant_id", "app_id", "user_id", "user_from", "conversation_id", "message_id",
    "invoke_from", "agent_mode", "query", "system_prompt", "model", "model_provider",
    "model_plugin_id",
})
JSON_PLACEHOLDERS = frozenset({"model_credentials", "model_settings", "inputs"})
LAYER_KEYS = frozenset({"name", "type", "deps", "metadata", "config"})


class CompositionTemplateError(ValueError):
    """The composition template cannot be used; raised at start-up, before any turn runs."""


@dataclass(frozen=True)
class CompositionTemplate:
    """A validated template; ``layer_names`` is the composition's logical identity."""

    source: str
    layers: tuple[dict[str, Any], ...]

    @property
    def layer_names(self) -> tuple[str, ...]:
        return tuple(layer["name"] for layer in self.layers)

    def fill(self, values: dict[str, Any]) -> dict[str, Any]:
        return {"schema_version": 1, "layers": [_fill(layer, values) for layer in self.layers]}


def load_template(path: Path) -> CompositionTemplate:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise CompositionTemplateError(f"composition template {path}: {exc.strerror}") from exc
    try:
        document = json.loads(text)
    except ValueError as exc:
        raise CompositionTemplateError(f"composition template {path}: not JSON ({exc})") from exc
    return parse_template(document, source=str(path))


def parse_template(document: Any, *, source: str = "<template>") -> CompositionTemplate:
    def fail(problem: str) -> CompositionTemplateError:
        return CompositionTemplateError(f"composition template {source}: {problem}")

    if not isinstance(document, dict):
        raise fail("must be a JSON object with schema_version and layers")
    unknown = set(document) - {"schema_version", "layers"}
    if unknown:
        raise fail(f"unknown top-level keys {sorted(unknown)}")
    if document.get("schema_version") != 1:
        raise fail("schema_version must be 1")
    layers = document.get("layers")
    if not isinstance(layers, list) or not layers:
        raise fail("layers must be a non-empty list")

    names: list[str] = []
    for position, layer in enumerate(layers):
        if not isinstance(layer, dict):
            raise fail(f"layer {position} must be an object")
        extra = set(layer) - LAYER_KEYS
        if extra:
            raise fail(f"layer {position}: unknown keys {sorted(extra)}")
        for key in ("name", "type"):
            if not isinstance(layer.get(key), str) or not layer[key].strip():
                raise fail(f"layer {position}: {key} must be a non-empty string")
        if PLACEHOLDER.search(layer["name"]) or PLACEHOLDER.search(layer["type"]):
            raise fail(f"layer {position}: name and type cannot hold placeholders")
        if layer["name"] in names:
            raise fail(f"layer name {layer['name']!r} is used twice")
        names.append(layer["name"])
        if "metadata" in layer and not isinstance(layer["metadata"], dict):
            raise fail(f"layer {layer['name']!r}: metadata must be an object")
    for layer in layers:
        deps = layer.get("deps", {})
        if not isinstance(deps, dict) or not all(isinstance(v, str) for v in deps.values()):
            raise fail(f"layer {layer['name']!r}: deps must map names to layer names")
        missing = [target for target in deps.values() if target not in names]
        if missing:
            raise fail(f"layer {layer['name']!r}: deps name unknown layers {missing}")

    for key in _keys(layers):
        if PLACEHOLDER.search(key):
            raise fail(f"placeholder in the object key {key!r}: only values can be filled in")
    used: set[str] = set()
    for text, whole in _strings(layers):
        for name in PLACEHOLDER.findall(text):
            used.add(name)
            if name in JSON_PLACEHOLDERS and not whole:
                raise fail(f"{{{{{name}}}}} holds JSON and must be a whole string value")
            if name not in TEXT_PLACEHOLDERS | JSON_PLACEHOLDERS:
                known = ", ".join(sorted(TEXT_PLACEHOLDERS | JSON_PLACEHOLDERS))
                raise fail(f"unknown placeholder {{{{{name}}}}} (known: {known})")
    if "query" not in used:
        raise fail("no layer carries {{query}}: the user's query would never reach the model")
    return CompositionTemplate(source=source, layers=tuple(layers))


def _keys(node: Any) -> Iterator[str]:
    """Every object key in a JSON tree."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield key
            yield from _keys(value)
    elif isinstance(node, list):
        for item in node:
            yield from _keys(item)


def _strings(node: Any) -> Iterator[tuple[str, bool]]:
    """Every string value in a JSON tree, with whether it is exactly one placeholder."""
    if isinstance(node, str):
        match = PLACEHOLDER.fullmatch(node.strip())
        yield node, match is not None
    elif isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from _strings(item)


def _fill(node: Any, values: dict[str, Any]) -> Any:
    if isinstance(node, str):
        whole = PLACEHOLDER.fullmatch(node.strip())
        if whole:
            return values[whole.group(1)]
        return PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), node)
    if isinstance(node, dict):
        return {key: _fill(value, values) for key, value in node.items()}
    if isinstance(node, list):
        return [_fill(item, values) for item in node]
    return node


def template_values(turn: TurnPayload, settings: Settings) -> dict[str, Any]:
    """What each placeholder stands for in this turn: payload values, then worker settings."""
    agent = turn.agent
    return {
        "tenant_id": turn.tenant_id,
        "app_id": turn.app_id,
        "user_id": turn.user_id,
        "user_from": turn.user_from,
        "conversation_id": turn.conversation_id,
        "message_id": turn.message_id,
        "invoke_from": turn.invoke_from,
        "agent_mode": settings.agent_mode,
        "query": turn.query,
        "system_prompt": (
            agent.system_prompt if agent.system_prompt is not None
            else settings.default_system_prompt
        ),
        "model": agent.model or settings.default_model,
        "model_provider": settings.model_provider,
        "model_plugin_id": settings.model_plugin_id,
        "model_credentials": settings.model_credentials_dict(),
        "model_settings": agent.parameters.as_model_settings(),
        "inputs": dict(turn.inputs),
    }


def idempotency_key(message_id: str, run_number: int) -> str:
    """The key under which the backend may dedupe a create: one per message and run number.

    The run number only moves on when an earlier run of the message is known to have ended
    without an answer, so a create repeated after an ambiguous failure (or a redelivery after a
    crash) carries the same key, and a deliberate fresh run does not collide with a dead one.
    """
    return f"agent-turn:{message_id}:{run_number}"


def build_run_request(
    turn: TurnPayload,
    template: CompositionTemplate,
    settings: Settings,
    *,
    session_snapshot: dict[str, Any] | None,
    run_number: int,
    deferred_tool_results: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``CreateRunRequest`` body for one turn (see ../shared/agent-protocol.md); a
    continuation after the user's answer carries ``deferred_tool_results``."""
    return {
        "composition": template.fill(template_values(turn, settings)),
        "session_snapshot": session_snapshot,
        "idempotency_key": idempotency_key(turn.message_id, run_number),
        "metadata": {
            "tenant_id": turn.tenant_id,
            "app_id": turn.app_id,
            "conversation_id": turn.conversation_id,
            "message_id": turn.message_id,
        },
        "deferred_tool_results": deferred_tool_results,
        "on_exit": {"default": "suspend", "layers": {}},
    }
