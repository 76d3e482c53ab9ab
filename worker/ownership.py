"""Who owns a turn, as the worker, the producer and the gateway all name it.

A conversation belongs to the (tenant, app, user) of its first turn, and a message to its
conversation and that owner (docs/contract.md, "Ownership"). The session store is the authority
(``SessionStore.claim``); this module holds the names the other parts share, standard library
only, so that a producer or the gateway can use them without the worker's dependencies:

- ``owner_fingerprint``: one short string for an owner, signed into stream tokens and written
  beside a turn's events, so the gateway can tell whose turn a stream is without a database;
- ``owner_key``: where the worker records the owner of a message before it publishes anything
  on the message's channel;
- ``refusal_stream``: where the ``error`` of a turn refused for ownership goes. It is named by
  the refused sender's fingerprint, so the rightful owner's clients, who read the message's own
  channel, never see it, and the refused sender's clients can (the gateway routes them there).
"""

from __future__ import annotations

import functools
import hashlib
import json

# Not in the id alphabet (worker/payload.py), so no message id can name a refusal stream.
_REFUSAL_SEPARATOR = "/refused/"


@functools.lru_cache(maxsize=4096)
def owner_fingerprint(tenant_id: str, app_id: str, user_id: str) -> str:
    """A fixed-length name for an owner; ids are joined unambiguously before hashing.

    Cached: a turn asks for its owner's several times as it starts (the store's claim, the
    owner record, the stop flag, the supervisor), each a JSON encoding and a hash.
    """
    joined = json.dumps([tenant_id, app_id, user_id], separators=(",", ":"))
    return hashlib.sha256(joined.encode()).hexdigest()[:32]


def owner_key(message_id: str) -> str:
    """The fingerprint of the message's owner, written by the worker once the store agrees."""
    return f"agent-turn:owner:{message_id}"


def refusal_stream(message_id: str, fingerprint: str) -> str:
    """The stream id (channel, log and seq keys) of a refused turn's one ``error`` event."""
    return f"{message_id}{_REFUSAL_SEPARATOR}{fingerprint}"
