"""How a run's ``output`` becomes the answer text (worker/answer.py)."""

from __future__ import annotations

from typing import Any

import pytest

from worker.answer import answer_text


@pytest.mark.parametrize("output", ["[turn 1] You said: hi.", "", "  padded  ", "héllo 世界 🙂",
                                    '{"answer": "not parsed"}', "null"])
def test_string_output_is_the_answer_as_is(output: str) -> None:
    assert answer_text(output) == output


def test_null_output_is_the_empty_answer() -> None:
    assert answer_text(None) == ""


def test_object_with_a_string_answer_field_answers_with_it() -> None:
    assert answer_text({"answer": "forty-two", "confidence": 0.9}) == "forty-two"


def test_object_with_a_string_text_field_answers_with_it() -> None:
    assert answer_text({"text": "hello", "sources": ["a"]}) == "hello"


def test_answer_field_wins_over_text_field() -> None:
    assert answer_text({"text": "from text", "answer": "from answer"}) == "from answer"


def test_empty_answer_field_is_still_the_answer() -> None:
    assert answer_text({"answer": "", "text": "ignored"}) == ""


@pytest.mark.parametrize(("output", "expected"), [
    ({"answer": {"value": 1}}, '{"answer":{"value":1}}'),
    ({"answer": None}, '{"answer":null}'),
    ({"answer": 42}, '{"answer":42}'),
    ({"answer": ["a", "b"]}, '{"answer":["a","b"]}'),
])
def test_object_whose_answer_is_not_a_string_is_compact_json(
        output: dict[str, Any], expected: str) -> None:
    assert answer_text(output) == expected


def test_non_string_answer_falls_back_to_a_string_text_field() -> None:
    assert answer_text({"answer": 1, "text": "fallback"}) == "fallback"


def test_object_whose_text_is_not_a_string_is_compact_json() -> None:
    assert answer_text({"text": ["x"]}) == '{"text":["x"]}'


def test_other_object_is_compact_json_keeping_key_order_and_non_ascii() -> None:
    output = {"zeta": 1, "alpha": "café", "nested": {"b": [1, 2], "a": "日本"}}

    assert answer_text(output) == '{"zeta":1,"alpha":"café","nested":{"b":[1,2],"a":"日本"}}'


def test_empty_object_is_compact_json() -> None:
    assert answer_text({}) == "{}"


@pytest.mark.parametrize(("output", "expected"), [
    ([], "[]"),
    (["a", 1, None, True], '["a",1,null,true]'),
    ([{"answer": "inner"}], '[{"answer":"inner"}]'),
    (["ü"], '["ü"]'),
])
def test_list_output_is_compact_json(output: list[Any], expected: str) -> None:
    assert answer_text(output) == expected


@pytest.mark.parametrize(("output", "expected"), [
    (0, "0"),
    (42, "42"),
    (-3, "-3"),
    (1.5, "1.5"),
    (True, "true"),
    (False, "false"),
])
def test_numbers_and_booleans_are_json_text(output: Any, expected: str) -> None:
    assert answer_text(output) == expected
