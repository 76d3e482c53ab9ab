"""Stream tokens: minted by the producer, checked by the gateway, bound to a turn, a user and
the owner (tenant, app, user) the gateway compares with the owner the worker recorded."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

import httpx
import pytest
import redis
from celery import Celery

from config.celery import celery_config
from config.settings import INSECURE_DEV_GATEWAY_SECRET, Settings
from gateway.tokens import StreamClaims, TokenRejected, mint_stream_token, verify_stream_token
from tests.conftest import (
    BROKER_DB,
    REDIS_HOST,
    REDIS_PORT,
    RunningGateway,
    base_settings,
    make_turn,
)
from worker.client import stream_token_for, submit_turn
from worker.ownership import owner_fingerprint

SECRET = b"unit-test-secret"
NOW = 1_800_000_000
OWNER = owner_fingerprint("tenant-1", "app-1", "user-1")


def mint(message_id: str = "msg-1", user_id: str = "user-1", ttl: int = 600,
         owner: str = OWNER) -> str:
    return mint_stream_token(SECRET, message_id=message_id, user_id=user_id, owner=owner,
                             ttl_seconds=ttl, now=NOW)


def rejection(token: str | None, message_id: str = "msg-1", now: float = NOW + 1,
              secret: bytes = SECRET) -> tuple[int, str]:
    with pytest.raises(TokenRejected) as caught:
        verify_stream_token(secret, token, message_id=message_id, now=now)
    return caught.value.status, caught.value.code


def with_claims(token: str, **changes: Any) -> str:
    version, claims_part, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(claims_part + "=" * (-len(claims_part) % 4)))
    claims.update(changes)
    encoded = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{version}.{encoded}.{signature}"


def test_a_token_opens_its_own_turn_until_it_expires() -> None:
    token = mint(message_id="msg-ä", user_id="user-7", ttl=600)

    claims = verify_stream_token(SECRET, token, message_id="msg-ä", now=NOW + 599)

    assert claims == StreamClaims(message_id="msg-ä", user_id="user-7", owner=OWNER,
                                  expires_at=NOW + 600)
    assert rejection(token, message_id="msg-ä", now=NOW + 600) == (401, "token_expired")


@pytest.mark.parametrize(("token", "expected"), [
    (None, (401, "token_missing")),
    ("", (401, "token_missing")),
    ("v1", (401, "token_invalid")),
    ("v1..", (401, "token_invalid")),
    ("v2.e30.AAAA", (401, "token_invalid")),
    ("v1.e30.!!!!", (401, "token_invalid")),
    ("v1.ünïcode.AAAA", (401, "token_invalid")),
])
def test_malformed_tokens_are_401(token: str | None, expected: tuple[int, str]) -> None:
    assert rejection(token) == expected


def test_a_token_for_another_turn_is_403() -> None:
    assert rejection(mint(message_id="msg-2")) == (403, "token_wrong_turn")


def test_changed_claims_break_the_signature() -> None:
    token = mint()

    assert rejection(with_claims(token, u="user-2")) == (401, "token_invalid")
    assert rejection(with_claims(token, e=NOW + 10**6)) == (401, "token_invalid")
    assert rejection(with_claims(mint(message_id="msg-2"), m="msg-1")) == (401, "token_invalid")


def test_a_changed_owner_breaks_the_signature() -> None:
    other = owner_fingerprint("tenant-2", "app-1", "user-1")

    assert rejection(with_claims(mint(), o=other)) == (401, "token_invalid")


def signed(claims: dict[str, Any], secret: bytes = SECRET) -> str:
    """Claims signed as the gateway signs them, whatever their shape."""
    encoded = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    signature = hmac.new(secret, f"v1.{encoded}".encode(), hashlib.sha256).digest()
    return f"v1.{encoded}.{base64.urlsafe_b64encode(signature).rstrip(b'=').decode()}"


@pytest.mark.parametrize("owner", [None, "", 7])
def test_a_well_signed_token_without_an_owner_is_401(owner: Any) -> None:
    claims: dict[str, Any] = {"m": "msg-1", "u": "user-1", "e": NOW + 600}
    if owner is not None:
        claims["o"] = owner

    assert rejection(signed(claims)) == (401, "token_invalid")


def test_the_gateway_refuses_a_token_minted_without_an_owner(gateway: RunningGateway) -> None:
    """Tokens of before owners were signed in open nothing: their holder's owner is unknown."""
    secret = gateway.settings.gateway_secret.get_secret_value().encode()
    token = signed({"m": "msg-ownerless", "u": "user-1", "e": int(time.time()) + 600}, secret)

    response = httpx.get(gateway.events_url("msg-ownerless"), params={"token": token},
                         timeout=5)

    assert response.status_code == 401
    assert response.json()["code"] == "token_invalid"


def test_stream_token_for_signs_the_owner_of_tenant_app_and_user() -> None:
    settings = base_settings(gateway_secret="a-producer-secret")

    token = stream_token_for("msg-1", "user-1", settings, tenant_id="tenant-1", app_id="app-1")
    claims = verify_stream_token(b"a-producer-secret", token, message_id="msg-1")

    assert claims.owner == OWNER
    assert claims.owner != owner_fingerprint("tenant-1", "app-2", "user-1")
    with pytest.raises(TypeError):
        stream_token_for("msg-1", "user-1", settings)  # type: ignore[call-arg]


def test_a_token_signed_with_another_secret_is_401() -> None:
    assert rejection(mint(), secret=b"another-secret") == (401, "token_invalid")


def test_well_signed_claims_of_the_wrong_shape_are_401() -> None:
    assert rejection(signed({"m": "msg-1", "u": 7, "o": OWNER, "e": "soon"})) == (
        401, "token_invalid")
    assert rejection(signed(["msg-1", "user-1", OWNER, NOW + 600])) == (401, "token_invalid")


def test_submit_turn_returns_a_stream_token_for_the_turn_and_its_owner() -> None:
    settings = base_settings(queue="gateway-token-test", gateway_secret="a-producer-secret")
    producer = Celery("token-test")
    producer.config_from_object(celery_config(settings))
    try:
        submitted = submit_turn(make_turn(tenant_id="tenant-9", user_id="user-42"),
                                celery_app=producer, settings=settings)
        claims = verify_stream_token(b"a-producer-secret", submitted.stream_token,
                                     message_id=submitted.message_id)
    finally:
        broker = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=BROKER_DB)
        broker.delete(settings.queue)
        broker.close()

    assert claims.user_id == "user-42"
    assert claims.owner == owner_fingerprint("tenant-9", "app-1", "user-42")
    assert abs(claims.expires_at - (time.time() + settings.gateway_token_ttl_seconds)) < 60


def test_the_default_secret_says_it_is_unsafe_and_is_never_shown() -> None:
    settings = Settings()

    assert "INSECURE" in INSECURE_DEV_GATEWAY_SECRET
    assert INSECURE_DEV_GATEWAY_SECRET not in repr(settings)
    assert INSECURE_DEV_GATEWAY_SECRET not in str(settings.model_dump())
