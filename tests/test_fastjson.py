"""The hot path's JSON (worker/fastjson.py): the same bytes as the standard library wrote, and
nothing the standard library could encode refused."""

from __future__ import annotations

import json
from typing import Any

import pytest

from worker import fastjson

MESSAGES: list[Any] = [
    {"event": "agent_message", "id": "m-1", "created_at": 1765000000, "answer": "hello wörld"},
    {"answer": "tab\t newline\n quote\" backslash\\ nul\u0000 bell\u0007 del\u007f"},
    {"answer": "line separator\u2028 paragraph\u2029 bom\ufeff emoji😀 cjk漢字"},
    {"metadata": {"usage": {"total_tokens": 17, "total_price": "0.0001"}}, "ok": True,
     "none": None, "list": [1, -2, "three"], "negative": -(2**63)},
]


@pytest.mark.parametrize("message", MESSAGES)
def test_encodes_the_bytes_the_standard_library_wrote(message: Any) -> None:
    expected = json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode()

    assert fastjson.encode(message) == expected


@pytest.mark.parametrize("message", [{"big": 2**70}, {1: "int key"}])
def test_encodes_what_orjson_refuses_with_the_standard_library(message: Any) -> None:
    expected = json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode()

    assert fastjson.encode(message) == expected


def test_a_lone_surrogate_still_cannot_be_encoded() -> None:
    with pytest.raises(UnicodeEncodeError):
        fastjson.encode({"answer": "a\ud800b"})


@pytest.mark.parametrize("raw", ['"\\ud800"', '{"a": NaN}', "[Infinity]", '{"a": 1', ""])
def test_decode_refuses_what_is_not_json_of_unicode_text(raw: str) -> None:
    with pytest.raises(ValueError):
        fastjson.decode(raw)


def test_decode_reads_text_and_bytes_alike() -> None:
    raw = '{"answer":"wörld😀","n":[1,2.5,null]}'

    assert fastjson.decode(raw) == fastjson.decode(raw.encode()) == json.loads(raw)


def test_decode_exact_keeps_every_digit_of_a_big_integer() -> None:
    assert fastjson.decode_exact(str(2**70 + 1)) == 2**70 + 1
    assert fastjson.decode(str(2**70 + 1)) != 2**70 + 1  # why decode_exact exists
