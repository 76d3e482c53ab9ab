"""The composition template and the run request (worker/composition.py).

Pure tests: templates are files under ``tmp_path`` or documents given to ``parse_template``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from config.settings import Settings
from worker.composition import (
    CompositionTemplate,
    CompositionTemplateError,
    build_run_request,
    idempotency_key,
    load_template,
    parse_template,
)
from worker.payload import TurnPayload, parse_turn

DEFAULT_LAYERS = ("execution_context", "prompt", "history", "llm")


def make_turn(settings: Settings | None = None, **overrides: Any) -> TurnPayload:
    raw: dict[str, Any] = {
        "tenant_id": "tenant-1",
        "app_id": "app-1",
        "user_id": "user-1",
        "conversation_id": "conv-1",
        "message_id": "msg-1",
        "query": "What is {{2+2}}?",
    }
    raw.update(overrides)
    return parse_turn(raw, settings or Settings())


def default_template() -> CompositionTemplate:
    return load_template(Settings().composition_template)


def layer(request: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [item for item in request["composition"]["layers"] if item["name"] == name]
    return found


def minimal_document(**layer_fields: Any) -> dict[str, Any]:
    """A one-layer template that is valid, with ``layer_fields`` merged into its layer."""
    only = {"name": "prompt", "type": "plain.prompt", "config": {"user": "{{query}}"}}
    only.update(layer_fields)
    return {"schema_version": 1, "layers": [only]}


def template_error(document: Any) -> str:
    with pytest.raises(CompositionTemplateError) as caught:
        parse_template(document, source="t.json")
    message = str(caught.value)
    assert message.startswith("composition template t.json: ")
    return message


def all_strings(node: Any) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for key, value in node.items() for s in (*all_strings(key), *all_strings(value))]
    if isinstance(node, list):
        return [s for item in node for s in all_strings(item)]
    return []


# The shipped template ----------------------------------------------------------------------


def test_default_template_loads_with_the_four_reference_layers() -> None:
    template = default_template()

    assert template.layer_names == DEFAULT_LAYERS
    assert template.source == str(Settings().composition_template)


def test_default_template_is_the_shipped_file() -> None:
    path = Settings().composition_template

    assert path.name == "composition.default.json"
    assert path.is_file()


# build_run_request with the shipped template -----------------------------------------------


def test_run_request_fills_every_placeholder_of_the_default_template() -> None:
    settings = Settings(model_credentials='{"api_key":"k"}', agent_mode="agent_app",
                        model_plugin_id="langgenius/openai", model_provider="openai")
    turn = make_turn(settings, user_from="account", invoke_from="web-app",
                     agent={"system_prompt": "Be terse.", "model": "gpt-4o-mini"})

    request = build_run_request(turn, default_template(), settings,
                                session_snapshot=None, run_number=1)

    assert request["composition"]["schema_version"] == 1
    assert [item["name"] for item in request["composition"]["layers"]] == list(DEFAULT_LAYERS)
    assert layer(request, "execution_context") == {
        "name": "execution_context",
        "type": "dify.execution_context",
        "config": {
            "tenant_id": "tenant-1", "user_id": "user-1", "user_from": "account",
            "app_id": "app-1", "conversation_id": "conv-1", "agent_mode": "agent_app",
            "invoke_from": "web-app",
        },
    }
    assert layer(request, "prompt")["config"] == {"prefix": "Be terse.",
                                                  "user": "What is {{2+2}}?"}
    assert layer(request, "history") == {"name": "history", "type": "pydantic_ai.history"}
    assert layer(request, "llm") == {
        "name": "llm",
        "type": "dify.plugin.llm",
        "deps": {"execution_context": "execution_context"},
        "config": {
            "plugin_id": "langgenius/openai", "model_provider": "openai", "model": "gpt-4o-mini",
            "credentials": {"api_key": "k"}, "model_settings": None,
        },
    }


def test_run_request_leaves_no_placeholder_behind() -> None:
    settings = Settings(model_credentials='{"api_key":"k"}')
    turn = make_turn(settings, query="plain question")

    request = build_run_request(turn, default_template(), settings,
                                session_snapshot={"schema_version": 1}, run_number=2)

    assert "{{" not in json.dumps(request)
    assert all("{{" not in text for text in all_strings(request))


def test_run_request_credentials_are_an_object_not_text() -> None:
    settings = Settings(model_credentials='{"api_key":"k","base":{"url":"https://x"}}')

    request = build_run_request(make_turn(settings), default_template(), settings,
                                session_snapshot=None, run_number=1)

    assert layer(request, "llm")["config"]["credentials"] == {"api_key": "k",
                                                             "base": {"url": "https://x"}}


def test_run_request_carries_the_turn_model_parameters_as_model_settings() -> None:
    settings = Settings()
    turn = make_turn(settings, agent={"parameters": {"temperature": 0.2, "stop": ["END"]}})

    request = build_run_request(turn, default_template(), settings,
                                session_snapshot=None, run_number=1)

    assert layer(request, "llm")["config"]["model_settings"] == {"temperature": 0.2,
                                                                "stop": ["END"]}


def test_run_request_uses_the_default_system_prompt_when_the_turn_has_none() -> None:
    settings = Settings(default_system_prompt="You are the house assistant.")

    request = build_run_request(make_turn(settings), default_template(), settings,
                                session_snapshot=None, run_number=1)

    assert layer(request, "prompt")["config"]["prefix"] == "You are the house assistant."


def test_run_request_keeps_an_explicitly_empty_system_prompt() -> None:
    settings = Settings(default_system_prompt="default")
    turn = make_turn(settings, agent={"system_prompt": ""})

    request = build_run_request(turn, default_template(), settings,
                                session_snapshot=None, run_number=1)

    assert layer(request, "prompt")["config"]["prefix"] == ""


def test_run_request_model_defaults_to_the_settings_default_model() -> None:
    settings = Settings(default_model="house-model-1")

    request = build_run_request(make_turn(settings), default_template(), settings,
                                session_snapshot=None, run_number=1)

    assert layer(request, "llm")["config"]["model"] == "house-model-1"


def test_run_request_envelope_carries_snapshot_key_and_metadata() -> None:
    snapshot = {"schema_version": 1, "layers": [{"name": "history", "runtime_state": {}}]}
    settings = Settings()
    turn = make_turn(settings, message_id="msg-77")

    request = build_run_request(turn, default_template(), settings,
                                session_snapshot=snapshot, run_number=3)

    assert set(request) == {"composition", "session_snapshot", "idempotency_key", "metadata",
                            "deferred_tool_results", "on_exit"}
    assert request["session_snapshot"] == snapshot
    assert request["idempotency_key"] == "agent-turn:msg-77:3"
    assert request["metadata"] == {"tenant_id": "tenant-1", "app_id": "app-1",
                                   "conversation_id": "conv-1", "message_id": "msg-77"}
    assert request["deferred_tool_results"] is None
    assert request["on_exit"] == {"default": "suspend", "layers": {}}


def test_run_request_without_snapshot_sends_null() -> None:
    settings = Settings()

    request = build_run_request(make_turn(settings), default_template(), settings,
                                session_snapshot=None, run_number=1)

    assert request["session_snapshot"] is None


def test_idempotency_key_differs_per_run_number_and_message() -> None:
    keys = {idempotency_key("m1", 1), idempotency_key("m1", 2), idempotency_key("m2", 1)}

    assert keys == {"agent-turn:m1:1", "agent-turn:m1:2", "agent-turn:m2:1"}


def test_filling_does_not_change_the_template() -> None:
    template = default_template()
    before = copy.deepcopy(template.layers)
    settings = Settings(model_credentials='{"api_key":"k"}')

    build_run_request(make_turn(settings), template, settings, session_snapshot=None,
                      run_number=1)

    assert template.layers == before


# Placeholders in custom templates ----------------------------------------------------------


def test_placeholder_inside_a_longer_string_is_replaced_by_text() -> None:
    template = parse_template({"schema_version": 1, "layers": [{
        "name": "prompt", "type": "plain.prompt",
        "config": {"prefix": "[{{tenant_id}}/{{app_id}}] {{system_prompt}} (model {{model}})",
                   "user": "Q: {{ query }}"},
    }]})
    settings = Settings(default_model="m-1", default_system_prompt="Hello.")

    request = build_run_request(make_turn(settings, query="why?"), template, settings,
                                session_snapshot=None, run_number=1)

    assert layer(request, "prompt")["config"] == {
        "prefix": "[tenant-1/app-1] Hello. (model m-1)", "user": "Q: why?",
    }


def test_json_placeholders_keep_their_json_type_as_whole_values() -> None:
    template = parse_template({"schema_version": 1, "layers": [{
        "name": "prompt", "type": "plain.prompt",
        "metadata": {"inputs": "{{inputs}}", "settings": "{{model_settings}}"},
        "config": {"user": "{{query}}", "credentials": " {{model_credentials}} "},
    }]})
    settings = Settings(model_credentials='{"api_key":"k"}')
    turn = make_turn(settings, inputs={"n": 1, "tags": ["a"]},
                     agent={"parameters": {"max_tokens": 5}})

    request = build_run_request(turn, template, settings, session_snapshot=None, run_number=1)

    only = layer(request, "prompt")
    assert only["metadata"] == {"inputs": {"n": 1, "tags": ["a"]},
                                "settings": {"max_tokens": 5}}
    assert only["config"]["credentials"] == {"api_key": "k"}


def test_text_placeholder_in_a_dict_key_is_rejected() -> None:
    # Keys are the template's structure; filling them from a turn would let a payload value
    # collide with or shadow a key the backend relies on.
    document = {"schema_version": 1, "layers": [{
        "name": "prompt", "type": "plain.prompt",
        "config": {"user": "{{query}}", "by_tenant": {"t-{{tenant_id}}": "yes"}},
    }]}

    with pytest.raises(CompositionTemplateError, match="only values can be filled in"):
        parse_template(document)


def test_non_string_values_pass_through_unchanged() -> None:
    template = parse_template({"schema_version": 1, "layers": [{
        "name": "prompt", "type": "plain.prompt",
        "config": {"user": "{{query}}", "n": 3, "ok": True, "nothing": None, "xs": [1, "two"]},
    }]})
    settings = Settings()

    request = build_run_request(make_turn(settings), template, settings,
                                session_snapshot=None, run_number=1)

    assert layer(request, "prompt")["config"] == {"user": "What is {{2+2}}?", "n": 3,
                                                  "ok": True, "nothing": None, "xs": [1, "two"]}


def test_query_text_that_looks_like_a_placeholder_is_not_expanded() -> None:
    settings = Settings()
    turn = make_turn(settings, query="{{tenant_id}}")

    request = build_run_request(turn, default_template(), settings,
                                session_snapshot=None, run_number=1)

    assert layer(request, "prompt")["config"]["user"] == "{{tenant_id}}"


def test_load_template_reads_a_custom_file(tmp_path: Path) -> None:
    path = tmp_path / "custom.json"
    path.write_text(json.dumps({"schema_version": 1, "layers": [
        {"name": "ctx", "type": "fork.execution_context", "config": {"t": "{{tenant_id}}"}},
        {"name": "p", "type": "fork.prompt", "deps": {"ctx": "ctx"},
         "config": {"user": "{{query}}"}},
    ]}), encoding="utf-8")

    template = load_template(path)

    assert template.layer_names == ("ctx", "p")
    assert template.source == str(path)


# Template errors ---------------------------------------------------------------------------


def test_missing_template_file_is_a_template_error(tmp_path: Path) -> None:
    path = tmp_path / "absent.json"

    with pytest.raises(CompositionTemplateError, match="No such file or directory") as caught:
        load_template(path)

    assert str(path) in str(caught.value)


def test_template_that_is_not_json_is_a_template_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{"schema_version": 1, "layers": [', encoding="utf-8")

    with pytest.raises(CompositionTemplateError, match="not JSON") as caught:
        load_template(path)

    assert str(path) in str(caught.value)


@pytest.mark.parametrize("document", [[], "layers", None, 1])
def test_template_that_is_not_an_object_is_rejected(document: Any) -> None:
    assert "must be a JSON object with schema_version and layers" in template_error(document)


def test_template_file_holding_a_list_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "list.json"
    path.write_text("[]", encoding="utf-8")

    with pytest.raises(CompositionTemplateError, match="must be a JSON object"):
        load_template(path)


def test_unknown_top_level_key_is_rejected() -> None:
    document = minimal_document()
    document["on_exit"] = {}

    assert "unknown top-level keys ['on_exit']" in template_error(document)


@pytest.mark.parametrize("version", [2, 0, "1", None])
def test_wrong_schema_version_is_rejected(version: Any) -> None:
    document = minimal_document()
    document["schema_version"] = version

    assert "schema_version must be 1" in template_error(document)


def test_missing_schema_version_is_rejected() -> None:
    document = minimal_document()
    del document["schema_version"]

    assert "schema_version must be 1" in template_error(document)


@pytest.mark.parametrize("layers", [[], None, {"name": "prompt"}])
def test_empty_or_non_list_layers_are_rejected(layers: Any) -> None:
    assert "layers must be a non-empty list" in template_error(
        {"schema_version": 1, "layers": layers})


def test_layer_that_is_not_an_object_is_rejected() -> None:
    document = minimal_document()
    document["layers"].append("history")

    assert "layer 1 must be an object" in template_error(document)


def test_duplicate_layer_name_is_rejected() -> None:
    document = minimal_document()
    document["layers"].append({"name": "prompt", "type": "other.prompt"})

    assert "layer name 'prompt' is used twice" in template_error(document)


@pytest.mark.parametrize("key", ["name", "type"])
@pytest.mark.parametrize("value", [None, "", "   ", 3])
def test_layer_without_a_name_or_type_is_rejected(key: str, value: Any) -> None:
    document = minimal_document(**{key: value})

    assert f"layer 0: {key} must be a non-empty string" in template_error(document)


@pytest.mark.parametrize("key", ["name", "type"])
def test_layer_missing_name_or_type_key_is_rejected(key: str) -> None:
    document = minimal_document()
    del document["layers"][0][key]

    assert f"layer 0: {key} must be a non-empty string" in template_error(document)


@pytest.mark.parametrize("key", ["name", "type"])
def test_placeholder_in_layer_name_or_type_is_rejected(key: str) -> None:
    document = minimal_document(**{key: "x-{{tenant_id}}"})

    assert "layer 0: name and type cannot hold placeholders" in template_error(document)


def test_unknown_layer_key_is_rejected() -> None:
    document = minimal_document(settings={"a": 1})

    assert "layer 0: unknown keys ['settings']" in template_error(document)


def test_layer_metadata_must_be_an_object() -> None:
    assert "layer 'prompt': metadata must be an object" in template_error(
        minimal_document(metadata=["a"]))


def test_deps_naming_an_unknown_layer_is_rejected() -> None:
    document = minimal_document(deps={"execution_context": "ctx"})

    assert "layer 'prompt': deps name unknown layers ['ctx']" in template_error(document)


@pytest.mark.parametrize("deps", [["prompt"], {"x": 1}, None])
def test_deps_that_are_not_a_name_map_are_rejected(deps: Any) -> None:
    assert "layer 'prompt': deps must map names to layer names" in template_error(
        minimal_document(deps=deps))


def test_deps_may_name_a_later_layer() -> None:
    document = {"schema_version": 1, "layers": [
        {"name": "llm", "type": "x.llm", "deps": {"ctx": "ctx"}},
        {"name": "ctx", "type": "x.ctx", "config": {"user": "{{query}}"}},
    ]}

    assert parse_template(document).layer_names == ("llm", "ctx")


def test_unknown_placeholder_is_rejected_with_the_known_names() -> None:
    message = template_error(minimal_document(config={"user": "{{query}}",
                                                      "extra": "{{api_key}}"}))

    assert "unknown placeholder {{api_key}}" in message
    assert "known: " in message
    assert "query" in message.split("known: ", 1)[1]


def test_unknown_placeholder_inside_a_longer_string_is_rejected() -> None:
    message = template_error(minimal_document(config={"user": "{{query}} for {{tenant}}"}))

    assert "unknown placeholder {{tenant}}" in message


@pytest.mark.parametrize("name", ["model_credentials", "model_settings", "inputs"])
def test_json_placeholder_inside_a_longer_string_is_rejected(name: str) -> None:
    document = minimal_document(config={"user": "{{query}}", "x": f"key={{{{{name}}}}}"})

    assert f"{{{{{name}}}}} holds JSON and must be a whole string value" in template_error(
        document)


@pytest.mark.parametrize("name", ["model_credentials", "model_settings", "inputs"])
def test_json_placeholder_as_an_object_key_is_rejected(name: str) -> None:
    # A key cannot hold an object or null; the template is meant to be refused at start-up,
    # not to pass and then break every turn when it is filled.
    document = minimal_document(config={"user": "{{query}}", f"{{{{{name}}}}}": "value"})

    with pytest.raises(CompositionTemplateError):
        parse_template(document)


def test_template_without_query_is_rejected() -> None:
    document = minimal_document(config={"prefix": "{{system_prompt}}", "user": "{{ model }}"})

    assert "no layer carries {{query}}" in template_error(document)


def test_query_in_a_longer_string_or_metadata_is_enough() -> None:
    assert parse_template(minimal_document(config=None,
                                           metadata={"q": "Q: {{query}}"})).layer_names == (
        "prompt",)
