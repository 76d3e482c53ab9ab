"""The turn payload (worker/payload.py): what parses, and how every kind of bad input is refused.

Pure tests: no Redis, no database, no network. Settings are built explicitly so that limits are
the ones each test names.
"""

from __future__ import annotations

from typing import Any

import pytest

from config.settings import Settings
from worker.errors import InvalidTurnPayload, PermanentAgentError
from worker.payload import TurnPayload, parse_turn, valid_message_id

IDS = ("tenant_id", "app_id", "user_id", "conversation_id", "message_id")


def minimal_turn(**overrides: Any) -> dict[str, Any]:
    turn: dict[str, Any] = {
        "tenant_id": "tenant-1",
        "app_id": "app-1",
        "user_id": "user-1",
        "conversation_id": "conv-1",
        "message_id": "msg-1",
        "query": "hi",
    }
    turn.update(overrides)
    return turn


def with_parameters(**parameters: Any) -> dict[str, Any]:
    return minimal_turn(agent={"parameters": parameters})


def refusal(raw: Any, settings: Settings | None = None) -> InvalidTurnPayload:
    with pytest.raises(InvalidTurnPayload) as caught:
        parse_turn(raw, settings or Settings())
    return caught.value


# What parses -------------------------------------------------------------------------------


def test_minimal_turn_parses_with_defaults() -> None:
    turn = parse_turn(minimal_turn(), Settings())

    assert isinstance(turn, TurnPayload)
    assert (turn.tenant_id, turn.app_id, turn.user_id, turn.conversation_id, turn.message_id) == (
        "tenant-1", "app-1", "user-1", "conv-1", "msg-1")
    assert turn.query == "hi"
    assert turn.schema_version == 1
    assert turn.user_from == "end-user"
    assert turn.invoke_from == "service-api"
    assert turn.inputs == {}
    assert turn.agent.system_prompt is None
    assert turn.agent.model is None
    assert turn.agent.parameters.model_dump() == {
        "temperature": None, "top_p": None, "max_tokens": None, "presence_penalty": None,
        "frequency_penalty": None, "stop": None,
    }
    assert turn.agent.parameters.as_model_settings() is None


def test_full_turn_keeps_every_value() -> None:
    raw = minimal_turn(
        user_from="account",
        invoke_from="debugger",
        inputs={"topic": "cats", "n": 3},
        agent={
            "system_prompt": "Be brief.",
            "model": "gpt-4o-mini",
            "parameters": {"temperature": 0.5, "top_p": 1, "max_tokens": 100,
                           "presence_penalty": -2, "frequency_penalty": 2, "stop": ["END"]},
        },
    )

    turn = parse_turn(raw, Settings(allowed_models=["gpt-4o", "gpt-4o-mini"]))

    assert turn.user_from == "account"
    assert turn.invoke_from == "debugger"
    assert turn.inputs == {"topic": "cats", "n": 3}
    assert turn.agent.system_prompt == "Be brief."
    assert turn.agent.model == "gpt-4o-mini"
    assert turn.agent.parameters.as_model_settings() == {
        "temperature": 0.5, "top_p": 1, "max_tokens": 100, "presence_penalty": -2,
        "frequency_penalty": 2, "stop": ["END"],
    }


def test_model_settings_hold_only_the_parameters_the_turn_set() -> None:
    turn = parse_turn(with_parameters(temperature=0.0), Settings())

    assert turn.agent.parameters.as_model_settings() == {"temperature": 0.0}


def test_parsed_turn_is_immutable() -> None:
    turn = parse_turn(minimal_turn(), Settings())

    with pytest.raises(ValueError, match="frozen"):
        turn.query = "changed"  # type: ignore[misc]


@pytest.mark.parametrize("message_id", [
    "a",
    "0",
    "msg_1.2:3-4",
    "01J9Z3K6W8E2Q4R5T6Y7U8I9O0",
    "3f2c9a1e-8b7d-4c6e-9f0a-1b2c3d4e5f60",
    "a" * 128,
])
def test_accepts_ids_in_the_safe_alphabet(message_id: str) -> None:
    assert parse_turn(minimal_turn(message_id=message_id), Settings()).message_id == message_id


@pytest.mark.parametrize("model", ["gpt-4o", "openai/gpt-4o", "claude-3.5@2024:latest"])
def test_accepts_any_well_formed_model_when_no_allow_list_is_set(model: str) -> None:
    turn = parse_turn(minimal_turn(agent={"model": model}), Settings(allowed_models=[]))

    assert turn.agent.model == model


def test_accepts_query_of_exactly_the_limit_counted_in_characters() -> None:
    query = "é" * 10  # 10 characters, 20 bytes

    assert parse_turn(minimal_turn(query=query), Settings(max_query_chars=10)).query == query


def test_accepts_max_tokens_equal_to_the_output_limit() -> None:
    turn = parse_turn(with_parameters(max_tokens=50), Settings(max_output_tokens=50))

    assert turn.agent.parameters.max_tokens == 50


@pytest.mark.parametrize("temperature", [0, 0.0, 2, 2.0])
def test_accepts_temperature_at_the_bounds(temperature: float) -> None:
    turn = parse_turn(with_parameters(temperature=temperature), Settings())

    assert turn.agent.parameters.temperature == temperature


def test_accepts_four_stop_words() -> None:
    turn = parse_turn(with_parameters(stop=["a", "b", "c", "d"]), Settings())

    assert turn.agent.parameters.stop == ["a", "b", "c", "d"]


# Structural problems -----------------------------------------------------------------------


def test_rejects_unknown_top_level_field() -> None:
    error = refusal(minimal_turn(api_key="sk-123"))

    assert "api_key: Extra inputs are not permitted" in error.message


@pytest.mark.parametrize(("agent", "where"), [
    ({"credentials": {"api_key": "k"}}, "agent.credentials"),
    ({"parameters": {"seed": 1}}, "agent.parameters.seed"),
])
def test_rejects_unknown_nested_field(agent: dict[str, Any], where: str) -> None:
    error = refusal(minimal_turn(agent=agent))

    assert f"{where}: Extra inputs are not permitted" in error.message


@pytest.mark.parametrize(("overrides", "where"), [
    ({"query": 42}, "query"),
    ({"tenant_id": 1}, "tenant_id"),
    ({"app_id": 2}, "app_id"),
    ({"user_id": 3}, "user_id"),
    ({"conversation_id": 4}, "conversation_id"),
    ({"message_id": 5}, "message_id"),
    ({"inputs": ["a", "b"]}, "inputs"),
    ({"agent": "gpt-4o"}, "agent"),
    ({"agent": {"system_prompt": 7}}, "agent.system_prompt"),
    ({"agent": {"parameters": {"temperature": "0.7"}}}, "agent.parameters.temperature"),
    ({"agent": {"parameters": {"max_tokens": "100"}}}, "agent.parameters.max_tokens"),
    ({"agent": {"parameters": {"max_tokens": True}}}, "agent.parameters.max_tokens"),
    ({"agent": {"parameters": {"stop": "END"}}}, "agent.parameters.stop"),
])
def test_rejects_wrong_types_naming_the_field(overrides: dict[str, Any], where: str) -> None:
    error = refusal(minimal_turn(**overrides))

    assert error.message.startswith("invalid turn payload: ")
    assert f"{where}: " in error.message


@pytest.mark.parametrize("field", [*IDS, "query"])
def test_rejects_missing_required_field(field: str) -> None:
    raw = minimal_turn()
    del raw[field]

    error = refusal(raw)

    assert f"{field}: Field required" in error.message


@pytest.mark.parametrize(("overrides", "where"), [
    ({"schema_version": 2}, "schema_version"),
    ({"user_from": "admin"}, "user_from"),
    ({"invoke_from": "cli"}, "invoke_from"),
])
def test_rejects_values_outside_the_allowed_choices(overrides: dict[str, Any], where: str) -> None:
    error = refusal(minimal_turn(**overrides))

    assert f"{where}: Input should be" in error.message


@pytest.mark.parametrize(("raw", "type_name"), [
    ([minimal_turn()], "list"),
    (None, "NoneType"),
    ('{"query": "hi"}', "str"),
    (b'{"query": "hi"}', "bytes"),
    (42, "int"),
])
def test_rejects_non_object_payload(raw: Any, type_name: str) -> None:
    error = refusal(raw)

    assert error.message == f"turn payload must be a JSON object, not {type_name}"
    assert error.message_id is None


# Ids ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad_id", [
    "",
    "msg 1",
    " msg-1",
    "msg/1",
    "../etc",
    "-msg",
    "_msg",
    ".msg",
    "msg\n",
    "msg-1\nEXTRA",
    "mész",
    "a" * 129,
])
@pytest.mark.parametrize("field", IDS)
def test_rejects_ids_outside_the_safe_alphabet(field: str, bad_id: str) -> None:
    error = refusal(minimal_turn(**{field: bad_id}))

    assert f"{field}: String should match pattern" in error.message


@pytest.mark.parametrize("bad_model", ["gpt 4o", "-gpt", "a" * 129, ""])
def test_rejects_malformed_model_name(bad_model: str) -> None:
    error = refusal(minimal_turn(agent={"model": bad_model}))

    assert "agent.model: String should match pattern" in error.message


# Limits ------------------------------------------------------------------------------------


@pytest.mark.parametrize("query", ["", " ", "\n\t  \r\n"])
def test_rejects_empty_or_blank_query(query: str) -> None:
    error = refusal(minimal_turn(query=query))

    assert error.message == "invalid turn payload: query: must not be empty"


def test_rejects_query_longer_than_the_limit() -> None:
    error = refusal(minimal_turn(query="x" * 11), Settings(max_query_chars=10))

    assert error.message == "invalid turn payload: query: longer than 10 characters"


def test_rejects_system_prompt_longer_than_the_limit() -> None:
    settings = Settings(max_system_prompt_chars=5)

    error = refusal(minimal_turn(agent={"system_prompt": "abcdef"}), settings)

    assert "agent.system_prompt: longer than 5 characters" in error.message
    assert parse_turn(minimal_turn(agent={"system_prompt": "abcde"}), settings)


def test_rejects_inputs_larger_than_the_limit_counted_in_utf8_bytes() -> None:
    # '{"k": "éééééééé"}' is 17 characters but 25 bytes.
    raw = minimal_turn(inputs={"k": "é" * 8})

    error = refusal(raw, Settings(max_inputs_bytes=20))

    assert "inputs: 25 bytes, more than 20" in error.message
    assert parse_turn(raw, Settings(max_inputs_bytes=25)).inputs == {"k": "é" * 8}


def test_rejects_model_not_in_the_allow_list() -> None:
    settings = Settings(allowed_models=["gpt-4o", "gpt-4o-mini"])

    error = refusal(minimal_turn(agent={"model": "o1-pro"}), settings)

    assert "agent.model: 'o1-pro' is not one of the allowed models" in error.message


def test_allow_list_does_not_apply_when_the_turn_picks_no_model() -> None:
    turn = parse_turn(minimal_turn(), Settings(allowed_models=["gpt-4o-mini"]))

    assert turn.agent.model is None


def test_rejects_max_tokens_above_the_output_limit() -> None:
    error = refusal(with_parameters(max_tokens=101), Settings(max_output_tokens=100))

    assert "agent.parameters.max_tokens: more than 100" in error.message


@pytest.mark.parametrize("max_tokens", [0, -1])
def test_rejects_max_tokens_below_one(max_tokens: int) -> None:
    error = refusal(with_parameters(max_tokens=max_tokens))

    assert "agent.parameters.max_tokens: Input should be greater than or equal to 1" in (
        error.message)


@pytest.mark.parametrize(("parameter", "value", "bound"), [
    ("temperature", -0.1, "greater than or equal to 0"),
    ("temperature", 2.01, "less than or equal to 2"),
    ("top_p", 1.5, "less than or equal to 1"),
    ("presence_penalty", -2.5, "greater than or equal to -2"),
    ("frequency_penalty", 3, "less than or equal to 2"),
])
def test_rejects_model_parameters_out_of_range(parameter: str, value: float, bound: str) -> None:
    error = refusal(with_parameters(**{parameter: value}))

    assert f"agent.parameters.{parameter}: Input should be {bound}" in error.message


def test_rejects_more_than_four_stop_words() -> None:
    error = refusal(with_parameters(stop=["a", "b", "c", "d", "e"]))

    assert "agent.parameters.stop: List should have at most 4 items" in error.message


@pytest.mark.parametrize(("stop", "where"), [
    ([""], "agent.parameters.stop.0"),
    (["ok", "x" * 65], "agent.parameters.stop.1"),
])
def test_rejects_empty_or_overlong_stop_word(stop: list[str], where: str) -> None:
    error = refusal(with_parameters(stop=stop))

    assert f"{where}: " in error.message


# The error itself --------------------------------------------------------------------------


def test_error_carries_the_message_id_when_it_is_valid() -> None:
    error = refusal(minimal_turn(message_id="msg-42", query=12))

    assert error.message_id == "msg-42"
    assert "message_id=msg-42" in str(error)


def test_limit_error_carries_the_message_id() -> None:
    error = refusal(minimal_turn(message_id="msg-43", query="   "))

    assert error.message_id == "msg-43"


@pytest.mark.parametrize("message_id", ["bad id", 7, None, "a" * 129])
def test_error_carries_no_message_id_when_it_is_itself_invalid(message_id: Any) -> None:
    error = refusal(minimal_turn(message_id=message_id))

    assert error.message_id is None
    assert "message_id: " in error.message


def test_error_carries_no_message_id_when_it_is_missing() -> None:
    raw = minimal_turn()
    del raw["message_id"]

    assert refusal(raw).message_id is None


def test_several_structural_problems_are_named_in_one_message() -> None:
    raw = minimal_turn(tenant_id=5, inputs=[], colour="red",
                       agent={"parameters": {"temperature": "hot"}})

    error = refusal(raw)

    for where in ("tenant_id: ", "inputs: ", "colour: ", "agent.parameters.temperature: "):
        assert where in error.message
    assert error.message.count("; ") == 3


def test_several_limit_problems_are_named_in_one_message() -> None:
    settings = Settings(max_query_chars=3, max_system_prompt_chars=3, max_inputs_bytes=5,
                        allowed_models=["gpt-4o"], max_output_tokens=10)
    raw = minimal_turn(query="long query", inputs={"a": "bcdef"},
                       agent={"system_prompt": "long prompt", "model": "other",
                              "parameters": {"max_tokens": 11}})

    error = refusal(raw, settings)

    assert error.message == (
        "invalid turn payload: query: longer than 3 characters; "
        "inputs: 14 bytes, more than 5; "
        "agent.system_prompt: longer than 3 characters; "
        "agent.model: 'other' is not one of the allowed models; "
        "agent.parameters.max_tokens: more than 10"
    )


def test_structural_and_limit_problems_are_named_together() -> None:
    # parse_turn promises to name "every problem at once": a client that sent both a bad type
    # and a blank query should learn of both from one refusal, not one per round trip.
    error = refusal(minimal_turn(tenant_id=5, query="   "))

    assert "tenant_id: " in error.message
    assert "query: must not be empty" in error.message


def test_invalid_payload_is_permanent_and_not_retryable() -> None:
    error = refusal(minimal_turn(query=""))

    assert isinstance(error, PermanentAgentError)
    assert error.retryable is False
    assert error.code == "invalid_param"
    assert error.status == 400


# valid_message_id --------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "expected"), [
    ({"message_id": "msg-1"}, "msg-1"),
    ({"message_id": "msg-1", "query": 5, "junk": True}, "msg-1"),
    ({"message_id": "bad id"}, None),
    ({"message_id": 12}, None),
    ({"message_id": None}, None),
    ({}, None),
    (["msg-1"], None),
    ("msg-1", None),
    (None, None),
])
def test_valid_message_id_returns_only_a_usable_id(raw: Any, expected: str | None) -> None:
    assert valid_message_id(raw) == expected


# Text that is not text, and values built to hurt -------------------------------------------


@pytest.mark.parametrize(("overrides", "where"), [
    ({"query": "hi \ud800"}, "query"),
    ({"query": "a\x00b"}, "query"),
    ({"query": "clear \x1b[2J"}, "query"),
    ({"query": "bell \x07"}, "query"),
    ({"agent": {"system_prompt": "\udfff"}}, "agent.system_prompt"),
    ({"agent": {"parameters": {"stop": ["\x00"]}}}, "agent.parameters.stop.0"),
    ({"inputs": {"name": "\ud83d"}}, "inputs"),
    ({"inputs": {"\x00key": 1}}, "inputs"),
    ({"inputs": {"list": [1, {"deep": "\x7f"}]}}, "inputs"),
])
def test_rejects_text_that_is_not_valid_unicode_or_holds_control_characters(
        overrides: dict[str, Any], where: str) -> None:
    error = refusal(minimal_turn(**overrides))

    assert f"{where}: " in str(error)
    assert "surrogate" in str(error) or "control character" in str(error)


def test_accepts_tabs_line_breaks_and_any_valid_unicode_in_text() -> None:
    text = "line 1\nline 2\r\n\tindented — ✓ 🙂 \u2028 中文"

    turn = parse_turn(minimal_turn(query=text, inputs={"k": [text, {"k2": text}]}), Settings())

    assert turn.query == text


def test_rejects_a_boolean_schema_version() -> None:
    assert "schema_version" in str(refusal(minimal_turn(schema_version=True)))


def test_rejects_inputs_nested_deeper_than_the_limit() -> None:
    deep: Any = "leaf"
    for _ in range(5):
        deep = {"d": deep}

    assert parse_turn(minimal_turn(inputs=deep), Settings(max_inputs_depth=5))
    error = refusal(minimal_turn(inputs={"wrap": deep}), Settings(max_inputs_depth=5))
    assert "nested deeper than 5 levels" in str(error)


def test_inputs_nested_past_the_recursion_limit_are_refused_without_recursing() -> None:
    deep: Any = []
    for _ in range(50_000):
        deep = [deep]

    assert "nested deeper" in str(refusal(minimal_turn(inputs={"d": deep})))


def test_the_refusal_of_huge_hostile_keys_is_bounded_and_escaped() -> None:
    hostile = {f"k{n}\n2026-12-02 CRITICAL forged" + "x" * 10_000: n for n in range(20)}

    message = str(refusal(minimal_turn(**hostile)))

    assert len(message) <= 1_100
    assert "\n" not in message and "\\x0a2026-12-02 CRITICAL" in message
    assert "chars)" in message, "a cut value says how much was left out"
