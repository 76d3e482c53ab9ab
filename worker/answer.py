"""Turning a run's ``output`` into the answer text a chat client shows.

The rule, which docs/contract.md repeats for the teams that build against it:

- a string is the answer as is;
- null (a run that produced no output) is the empty answer;
- an object with a string ``answer`` field, or else a string ``text`` field, answers with that
  field: structured-output schemas that carry a human answer beside other data put it there;
- anything else (other objects, lists, numbers, booleans) is compact JSON text, keys in the order
  the backend sent them, non-ASCII kept as is.
"""

from __future__ import annotations

import json
from typing import Any

ANSWER_FIELDS = ("answer", "text")


def answer_text(output: Any) -> str:
    if isinstance(output, str):
        return output
    if output is None:
        return ""
    if isinstance(output, dict):
        for field in ANSWER_FIELDS:
            if isinstance(output.get(field), str):
                return output[field]
    return json.dumps(output, ensure_ascii=False, separators=(",", ":"))
