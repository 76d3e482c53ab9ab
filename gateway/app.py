"""The gateway's Starlette app: routes, and the shared Redis clients its lifespan owns.

``GET /v1/turns/{message_id}/events`` streams one turn (docs/gateway.md); ``HEAD`` on it
checks the token and the resume point only and answers at once (a HEAD handled as a GET would
wait on the turn, with no body to send); ``POST /v1/turns/{message_id}/human-input`` takes the
user's answer to the question the turn asked, with the same token, so that a browser holding
only its stream token can answer; ``GET /demo`` is a page that watches one in a browser;
``GET /healthz`` says whether Redis is reachable and how many streams are open. Everything a
stream needs is checked before the response starts — the token, the resume point, the owner,
the subscription, the log — so a refusal is a JSON error, never a stream that stops early.

Values from the request (the message id in the path, the user id in the token) reach log lines
only as ``%s`` arguments: the process's log records (``worker.logs.SafeLogRecord``, installed
by ``python -m gateway``) escape and cut arguments, so they cannot forge or flood a line.
"""

from __future__ import annotations

import gc
import json
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from celery import Celery
from kombu.exceptions import OperationalError as BrokerError
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from config.settings import INSECURE_DEV_GATEWAY_SECRET, Settings, get_settings
from gateway.relay import PubSubHub, ReplayLog, StreamCounters, StreamRefused, TurnStreams
from gateway.sse import STREAM_HEADERS, UVICORN_CYCLE, EventStreamResponse
from gateway.tokens import StreamClaims, TokenRejected, verify_stream_token
from worker.client import producer_app, submit_human_input_for
from worker.errors import AgentBackendError, InvalidTurnPayload
from worker.logs import install_safe_log_records
from worker.payload import parse_human_answer

log = logging.getLogger(__name__)

DEMO_PAGE = Path(__file__).resolve().parent / "demo.html"
# An answer's body may hold, besides its values (at most AGENT_TURN_MAX_HUMAN_INPUT_BYTES as
# the payload counts them), the call id and action (up to 192 characters, escaped maybe six
# bytes each) and the JSON around them. A body past this is refused before it is parsed.
HUMAN_INPUT_BODY_SLACK_BYTES = 4096


class GatewayApp(Starlette):
    """The gateway's Starlette app, which hands each stream the uvicorn connection it came on.

    Starlette's middleware wraps ``send`` before a route sees it; only here, at the top, is it
    still uvicorn's own, whose connection a stream writes its live frames to
    (``gateway.sse.DirectWriter``). Only uvicorn's httptools protocol is recognised; under any
    other server or protocol every frame goes through ``send``.
    """

    def __init__(self, *, direct_writes: bool, **options: Any) -> None:
        super().__init__(**options)
        self._direct_writes = direct_writes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        cycle = getattr(send, "__self__", None)
        if self._direct_writes and scope["type"] == "http" and cycle is not None \
                and type(cycle).__module__ == "uvicorn.protocols.http.httptools_impl":
            scope = {**scope, "extensions": {**scope.get("extensions", {}),
                                             UVICORN_CYCLE: cycle}}
        await super().__call__(scope, receive, send)


def error_response(status: int, code: str, message: str) -> JSONResponse:
    """Errors in the shape of Dify's API errors."""
    headers = {"WWW-Authenticate": 'Bearer realm="agent-turn"'} if status == 401 else None
    return JSONResponse({"status": status, "code": code, "message": message},
                        status_code=status, headers=headers)


def _token_of(request: Request) -> str | None:
    """From ``?token=`` (EventSource cannot set headers) or ``Authorization: Bearer``."""
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return request.query_params.get("token")


# Seqs are Redis stream entry ids (``<seq>-0``), 64-bit; a signed maximum leaves room for the
# ``after + 1`` of a log read. Digits only: ``int()`` would also take "+2", " 3 " and "1_0".
_RESUME_POINT = re.compile(r"[0-9]{1,19}")
MAX_RESUME_POINT = 2**63 - 1
RESUME_POINT_RULE = ("Last-Event-ID and ?after= must be a seq: digits only, 0 to "
                     f"{MAX_RESUME_POINT}")


def _resume_point(request: Request) -> int | None:
    """The seq the client already has: ``Last-Event-ID`` (EventSource sets it) or ``?after=``;
    0 when neither is given; None when the one given is not a seq.

    An empty ``Last-Event-ID`` is no resume point (the SSE spec's "no last event id"); a given
    ``?after=`` must be a seq, empty or not.
    """
    raw = request.headers.get("last-event-id") or request.query_params.get("after")
    if raw is None:
        return 0
    if not _RESUME_POINT.fullmatch(raw):
        return None
    after = int(raw)
    return after if after <= MAX_RESUME_POINT else None


def _claims_or_refusal(request: Request, secret: bytes,
                       what: str = "stream") -> StreamClaims | Response:
    """The token's claims for the path's turn, or the error response that refuses the request
    (``what`` names it in the log: a stream, an answer)."""
    message_id = request.path_params["message_id"]
    try:
        return verify_stream_token(secret, _token_of(request), message_id=message_id)
    except TokenRejected as exc:
        log.info("%s of turn %s refused: %s", what, message_id, exc.code)
        return error_response(exc.status, exc.code, exc.message)


async def _body_within(request: Request, limit: int) -> bytes | None:
    """The request's body, or None when it is longer than ``limit``: refused on its
    ``Content-Length`` before a byte of it is read, else as soon as the read passes the limit,
    so no more than ``limit`` bytes of it are ever held."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# First-generation threshold once start-up objects are frozen (CPython's default is 700).
GC_THRESHOLD = 50_000


def _freeze_start_up_objects() -> None:
    """Keep the garbage collector off what start-up made, as the worker does (worker/tasks.py):
    full collections walked ~220k start-up objects and paused every stream 70-119 ms."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, *gc.get_threshold()[1:])


def create_app(settings: Settings | None = None) -> GatewayApp:
    install_safe_log_records()  # in every process that serves, uvicorn's workers included
    settings = settings or get_settings()
    secret = settings.gateway_secret.get_secret_value().encode()
    hub = PubSubHub(settings.pubsub_url,
                    health_check_seconds=settings.gateway_redis_health_check_seconds,
                    read_batch_seconds=settings.gateway_read_batch_ms / 1000)
    pool = aioredis.BlockingConnectionPool.from_url(
        settings.pubsub_url, max_connections=settings.gateway_redis_max_connections,
        timeout=settings.gateway_subscribe_timeout_seconds, socket_connect_timeout=5,
        socket_timeout=10)
    replay_log = ReplayLog(aioredis.Redis(connection_pool=pool),
                           page_size=settings.gateway_replay_page_size,
                           max_reads=settings.gateway_redis_max_connections,
                           reread_spread=settings.gateway_reread_spread_seconds)
    counters = StreamCounters()
    body_limit = settings.max_human_input_bytes + HUMAN_INPUT_BODY_SLACK_BYTES
    # Made on the first answer: a gateway nobody answers through never connects to the broker.
    producer: Celery | None = None
    streams = TurnStreams(
        hub=hub, replay_log=replay_log, channel_for=settings.channel_for,
        buffer_events=settings.gateway_client_buffer_events,
        subscribe_timeout=settings.gateway_subscribe_timeout_seconds,
        first_event_timeout=settings.gateway_first_event_timeout_seconds, counters=counters,
        pubsub_outage=settings.gateway_pubsub_outage_seconds)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if secret == INSECURE_DEV_GATEWAY_SECRET.encode():
            log.warning("AGENT_TURN_GATEWAY_SECRET is not set: stream tokens are signed with "
                        "the public development secret; anyone can mint one. Set it in "
                        "production.")
        _freeze_start_up_objects()
        hub.start()
        yield
        await hub.stop()
        await pool.disconnect()
        if producer is not None:
            await run_in_threadpool(producer.close)

    async def turn_events(request: Request) -> Response:
        claims = _claims_or_refusal(request, secret)
        if isinstance(claims, Response):
            return claims
        after = _resume_point(request)
        if after is None:
            return error_response(400, "invalid_param", RESUME_POINT_RULE)
        try:
            stream = await streams.open(message_id=claims.message_id, user_id=claims.user_id,
                                        owner=claims.owner, after=after)
        except StreamRefused as refused:
            log.info("stream of turn %s refused: %s", claims.message_id,
                     refused.code or refused.status)
            if refused.status == 204:
                # The client has the end already: 204 tells an EventSource to stop retrying.
                return Response(status_code=204)
            return error_response(refused.status, refused.code, refused.message)
        except RedisError as exc:
            log.warning("stream of turn %s refused, Redis failed: %s", claims.message_id, exc)
            return error_response(503, "event_bus_unavailable", "the turn's events are "
                                  "unavailable right now; retry shortly")
        return EventStreamResponse(stream, ping_interval=settings.gateway_ping_interval_seconds,
                                   send_timeout=settings.gateway_send_timeout_seconds)

    async def turn_events_head(request: Request) -> Response:
        """What a GET would start with, as far as is known without Redis: the token's and the
        resume point's refusals, else the stream's status and headers. The turn's own state
        (204, 410, a resume point past its end) is only known to a GET."""
        claims = _claims_or_refusal(request, secret)
        if isinstance(claims, Response):
            return claims
        if _resume_point(request) is None:
            return error_response(400, "invalid_param", RESUME_POINT_RULE)
        head = Response(status_code=200, headers=STREAM_HEADERS,
                        media_type=EventStreamResponse.media_type)
        del head.headers["content-length"]  # the stream it stands for has none
        return head

    async def human_input(request: Request) -> Response:
        """The user's answer to the turn's question, authorised by their stream token.

        A browser holds only that token, which names the owner by fingerprint;
        ``submit_human_input_for`` checks and enqueues the answer as ``submit_human_input``
        does for a web tier. It talks to Redis and the broker, blocking, so it runs in a
        thread: the streams on this event loop never wait for it.
        """
        nonlocal producer
        claims = _claims_or_refusal(request, secret, "answer")
        if isinstance(claims, Response):
            return claims
        body = await _body_within(request, body_limit)
        if body is None:
            log.info("answer to turn %s refused: body over %d bytes", claims.message_id,
                     body_limit)
            return error_response(413, "payload_too_large",
                                  f"an answer's body is at most {body_limit} bytes")
        try:
            raw = json.loads(body, parse_constant=_no_constants)
        except (ValueError, RecursionError):
            log.info("answer to turn %s refused: body not JSON", claims.message_id)
            return error_response(400, "invalid_param", 'the body must be a JSON object: '
                                  '{"tool_call_id", "action", "values"}')
        try:
            answer = parse_human_answer(raw, settings)
        except InvalidTurnPayload as invalid:
            log.info("answer to turn %s refused: %s", claims.message_id, invalid.code)
            return error_response(invalid.status, invalid.code, invalid.message)
        if producer is None:
            producer = producer_app(settings)
        try:
            task_id = await run_in_threadpool(
                submit_human_input_for, claims.message_id, answer.tool_call_id,
                answer.action, answer.values, owner=claims.owner, celery_app=producer,
                settings=settings)
        except AgentBackendError as refused:
            log.info("answer to turn %s refused: %s", claims.message_id, refused.code)
            return error_response(refused.status, refused.code, refused.message)
        except RedisError as exc:
            log.warning("answer to turn %s failed, Redis failed: %s", claims.message_id, exc)
            return error_response(503, "event_bus_unavailable", "the answer cannot be taken "
                                  "right now; retry shortly")
        except BrokerError as exc:
            log.warning("answer to turn %s failed, the broker failed: %s", claims.message_id,
                        exc)
            return error_response(503, "broker_unavailable", "the answer cannot be taken "
                                  "right now; retry shortly")
        log.info("answer to turn %s from user %s enqueued as task %s", claims.message_id,
                 claims.user_id, task_id)
        return JSONResponse({"task_id": task_id}, status_code=202)

    async def demo(request: Request) -> Response:
        return FileResponse(DEMO_PAGE, media_type="text/html")

    async def healthz(request: Request) -> Response:
        hub_stats = hub.stats()
        return JSONResponse({
            "status": "ok" if hub_stats["redis_connected"] else "degraded",
            **hub_stats,
            "client_buffer_events": settings.gateway_client_buffer_events,
            "open_streams": counters.open,
            "closed_streams": dict(counters.closed),
            "cut_streams": counters.cut(),
            "frames_sent": counters.frames,
            "writes": counters.writes,
            "direct_writes": counters.direct_writes,
            "waiting_log_reads": replay_log.waiting_reads,
            "gc_frozen_objects": gc.get_freeze_count(),
        }, status_code=200 if hub_stats["redis_connected"] else 503)

    return GatewayApp(direct_writes=settings.gateway_direct_writes, routes=[
        # HEAD first: the GET route would answer HEAD too, by running the stream.
        Route("/v1/turns/{message_id}/events", turn_events_head, methods=["HEAD"]),
        Route("/v1/turns/{message_id}/events", turn_events, methods=["GET"]),
        Route("/v1/turns/{message_id}/human-input", human_input, methods=["POST"]),
        Route("/demo", demo, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
    ], lifespan=lifespan)
