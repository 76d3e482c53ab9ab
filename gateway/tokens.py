"""Stream tokens: who may read which turn's events, and until when.

A token is minted by the producer (``worker.client.submit_turn``) for the user who asked, and
checked by the gateway on every connection. It is an HMAC-SHA256 signature, under a secret only
the producer and the gateway hold, of the message id, the user id, the owner's fingerprint
(``worker.ownership.owner_fingerprint`` of tenant, app and user) and an expiry:

    v1.<base64url(JSON claims)>.<base64url(HMAC-SHA256(secret, "v1." + claims part))>

so it cannot be forged, altered (another user or owner, a later expiry) or used for another turn,
and the gateway needs no lookup to check it. The owner is what the gateway compares with the
owner the worker recorded for the message (docs/gateway.md, "Owners"): a message id alone does
not say whose turn it is, since a turn's payload may name any message id. Standard library
only: a producer that imports this does not pull in the gateway's server stack.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from dataclasses import dataclass

VERSION = "v1"


@dataclass(frozen=True, slots=True)
class StreamClaims:
    message_id: str
    user_id: str
    # ``owner_fingerprint(tenant_id, app_id, user_id)`` of the user the token was minted for.
    owner: str
    expires_at: int


class TokenRejected(Exception):
    """Why a token does not open a stream; ``status`` and ``code`` go into the JSON error."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def _b64encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _signature(secret: bytes, signed_part: str) -> bytes:
    return hmac.new(secret, signed_part.encode(), hashlib.sha256).digest()


def mint_stream_token(secret: bytes, *, message_id: str, user_id: str, owner: str,
                      ttl_seconds: int, now: float | None = None) -> str:
    """A token that lets ``user_id`` (whose owner fingerprint is ``owner``) read turn
    ``message_id`` for ``ttl_seconds``, if the turn is that owner's."""
    expires_at = int(now if now is not None else time.time()) + ttl_seconds
    claims = json.dumps({"m": message_id, "u": user_id, "o": owner, "e": expires_at},
                        separators=(",", ":"), ensure_ascii=False)
    signed_part = f"{VERSION}.{_b64encode(claims.encode())}"
    return f"{signed_part}.{_b64encode(_signature(secret, signed_part))}"


def verify_stream_token(secret: bytes, token: str | None, *, message_id: str,
                        now: float | None = None) -> StreamClaims:
    """The token's claims if it opens ``message_id`` now; else ``TokenRejected``.

    The signature is checked (in constant time) before anything in the claims is believed.
    No token, a malformed or badly signed one (a token minted before owners were signed in, with
    no ``o`` claim, included) and an expired one are 401s: the caller has not shown who they
    are. A good token for another turn is a 403: they have, and may not. Whether the turn is
    the token's owner's is for the gateway to find out (``gateway.relay``): it needs Redis.
    """
    if not token:
        raise TokenRejected(401, "token_missing",
                            "a stream token is required (?token= or Authorization: Bearer)")
    version, _, rest = token.partition(".")
    claims_part, _, signature_part = rest.partition(".")
    if version != VERSION or not claims_part or not signature_part:
        raise TokenRejected(401, "token_invalid", "the stream token is malformed")
    try:
        signature = _b64decode(signature_part)
    except (binascii.Error, ValueError):
        raise TokenRejected(401, "token_invalid", "the stream token is malformed") from None
    if not hmac.compare_digest(signature, _signature(secret, f"{version}.{claims_part}")):
        raise TokenRejected(401, "token_invalid", "the stream token's signature is not valid")
    try:
        raw = json.loads(_b64decode(claims_part))
        claims = StreamClaims(message_id=raw["m"], user_id=raw["u"], owner=raw["o"],
                              expires_at=raw["e"])
    except (binascii.Error, ValueError, KeyError, TypeError):
        raise TokenRejected(401, "token_invalid", "the stream token is malformed") from None
    if not (isinstance(claims.message_id, str) and isinstance(claims.user_id, str)
            and isinstance(claims.owner, str) and claims.owner
            and type(claims.expires_at) is int):
        raise TokenRejected(401, "token_invalid", "the stream token is malformed")
    if claims.expires_at <= (now if now is not None else time.time()):
        raise TokenRejected(401, "token_expired", "the stream token has expired")
    if claims.message_id != message_id:
        raise TokenRejected(403, "token_wrong_turn",
                            "the stream token was issued for another turn")
    return claims
