"""JSON on the hot path of a turn: each backend frame decoded, each bus message encoded.

A turn decodes one frame and encodes one message per answer delta, so the standard library's
JSON was a tenth of what a delta cost the worker (docs/performance.md). orjson does both in C,
a third of the time for a frame and a tenth for a message, and its output for the messages is
byte for byte the standard library's with ``ensure_ascii=False`` and compact separators.

Where the two differ, what was valid before stays so:

- ``decode`` refuses what is not JSON (``NaN``, ``Infinity``) and text that is not Unicode (a
  lone surrogate escape such as ``"\\ud800"``), which the standard library let through to fail
  later in whatever wrote it out. The caller turns the ``ValueError`` into its own error.
- orjson reads an integer beyond 64 bits as a float. ``decode_exact`` uses the standard library
  for values whose every digit must survive, such as a run's session snapshot, which is saved.
- ``encode`` falls back to the standard library for what orjson refuses (an integer beyond 64
  bits, a key that is not a string), so a message that could be encoded before still is.
"""

from __future__ import annotations

import json
from typing import Any

import orjson


def decode(raw: str | bytes) -> Any:
    """One JSON document; ``ValueError`` if it is not valid JSON of valid Unicode text."""
    return orjson.loads(raw)


def decode_exact(raw: str | bytes) -> Any:
    """As ``decode``, but integers of any size keep every digit (the standard library)."""
    return json.loads(raw)


def encode(value: Any) -> bytes:
    """Compact UTF-8 JSON, non-ASCII text as is."""
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()
