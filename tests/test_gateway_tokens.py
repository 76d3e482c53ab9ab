"""Stream tokens: minted by the producer, checked by the gateway, bound to a turn and a user."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

import pytest
import redis
from celery import Celery

from config.celery import celery_config
from config.settings import INSECURE_DEV_GATEWAY_SECRET, Settings
from gateway.tokens import StreamClaims, TokenRejected, mint_stream_token, verify_stream_token
from tests.conftest import BROKER_DB, REDIS_HOST, REDIS_PORT, base_settings, make_turn
from worker.client import submit_turn

SECRET = b"unit-test-secret"
NOW = 1_800_000_000


def mint(message_id: str = "msg-1", user_id: str = "user-1", ttl: int = 600) -> str:
    return mint_stream_token(SECRET, message_id=message_id, user_id=user_id, ttl_seconds=ttl,
                             now=NOW)


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

    assert claims == StreamClaims(message_id="msg-ä", user_id="user-7", expires_at=NOW + 600)
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


def test_a_token_signed_with_another_secret_is_401() -> None:
    assert rejection(mint(), secret=b"another-secret") == (401, "token_invalid")


def test_well_signed_claims_of_the_wrong_shape_are_401() -> None:
    claims = base64.urlsafe_b64encode(b'{"m":"msg-1","u":7,"e":"soon"}').rstrip(b"=").decode()
    signature = hmac.new(SECRET, f"v1.{claims}".encode(), hashlib.sha256).digest()
    token = f"v1.{claims}.{base64.urlsafe_b64encode(signature).rstrip(b'=').decode()}"

    assert rejection(token) == (401, "token_invalid")


def test_submit_turn_returns_a_stream_token_for_the_turn_and_its_user() -> None:
    settings = base_settings(queue="gateway-token-test", gateway_secret="a-producer-secret")
    producer = Celery("token-test")
    producer.config_from_object(celery_config(settings))
    try:
        submitted = submit_turn(make_turn(user_id="user-42"), celery_app=producer,
                                settings=settings)
        claims = verify_stream_token(b"a-producer-secret", submitted.stream_token,
                                     message_id=submitted.message_id)
    finally:
        broker = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=BROKER_DB)
        broker.delete(settings.queue)
        broker.close()

    assert claims.user_id == "user-42"
    assert abs(claims.expires_at - (time.time() + settings.gateway_token_ttl_seconds)) < 60


def test_the_default_secret_says_it_is_unsafe_and_is_never_shown() -> None:
    settings = Settings()

    assert "INSECURE" in INSECURE_DEV_GATEWAY_SECRET
    assert INSECURE_DEV_GATEWAY_SECRET not in repr(settings)
    assert INSECURE_DEV_GATEWAY_SECRET not in str(settings.model_dump())
