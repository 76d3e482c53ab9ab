"""The gateway's Starlette app: routes, and the shared Redis clients its lifespan owns.

``GET /v1/turns/{message_id}/events`` streams one turn (docs/gateway.md); ``GET /demo`` is a
page that watches one in a browser; ``GET /healthz`` says whether Redis is reachable and how
many streams are open. Everything a stream needs is checked before the response starts — the
token, the resume point, the subscription, the log — so a refusal is a JSON error, never a
stream that stops early.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import redis.asyncio as aioredis
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from config.settings import INSECURE_DEV_GATEWAY_SECRET, Settings, get_settings
from gateway.relay import PubSubHub, ReplayLog, StreamCounters, TurnStream
from gateway.sse import EventStreamResponse
from gateway.tokens import TokenRejected, verify_stream_token

log = logging.getLogger(__name__)

DEMO_PAGE = Path(__file__).resolve().parent / "demo.html"


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


def _resume_point(request: Request) -> int | None:
    """The seq the client already has: ``Last-Event-ID`` (EventSource sets it) or ``?after=``."""
    raw = request.headers.get("last-event-id") or request.query_params.get("after") or "0"
    try:
        after = int(raw.strip())
    except ValueError:
        return None
    return after if after >= 0 else None


def create_app(settings: Settings | None = None) -> Starlette:
    settings = settings or get_settings()
    secret = settings.gateway_secret.get_secret_value().encode()
    hub = PubSubHub(settings.pubsub_url,
                    health_check_seconds=settings.gateway_redis_health_check_seconds)
    pool = aioredis.BlockingConnectionPool.from_url(
        settings.pubsub_url, max_connections=settings.gateway_redis_max_connections,
        timeout=settings.gateway_subscribe_timeout_seconds, socket_connect_timeout=5,
        socket_timeout=10)
    replay_log = ReplayLog(aioredis.Redis(connection_pool=pool),
                           page_size=settings.gateway_replay_page_size)
    counters = StreamCounters()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if secret == INSECURE_DEV_GATEWAY_SECRET.encode():
            log.warning("AGENT_TURN_GATEWAY_SECRET is not set: stream tokens are signed with "
                        "the public development secret; anyone can mint one. Set it in "
                        "production.")
        hub.start()
        yield
        await hub.stop()
        await pool.disconnect()

    async def turn_events(request: Request) -> Response:
        message_id = request.path_params["message_id"]
        try:
            claims = verify_stream_token(secret, _token_of(request), message_id=message_id)
        except TokenRejected as exc:
            log.info("stream of turn %s refused: %s", message_id, exc.code)
            return error_response(exc.status, exc.code, exc.message)
        after = _resume_point(request)
        if after is None:
            return error_response(400, "invalid_param",
                                  "Last-Event-ID and ?after= must be a seq, 0 or more")
        subscription = await hub.subscribe(settings.channel_for(message_id),
                                           buffer_events=settings.gateway_client_buffer_events)
        opened = False
        try:
            if not await subscription.wait_ready(settings.gateway_subscribe_timeout_seconds):
                return error_response(503, "event_bus_unavailable",
                                      "the gateway cannot subscribe to the turn's events")
            if after > 0:
                seen = await replay_log.event(message_id, after)
                if seen is not None and seen.terminal:
                    # The client has the end already: 204 tells an EventSource to stop retrying.
                    return Response(status_code=204)
            first_page = await replay_log.read_after(message_id, after)
            if not first_page and await replay_log.expired(message_id):
                return error_response(410, "turn_expired",
                                      "the turn ended long ago and its events are gone")
            stream = TurnStream(
                message_id=message_id, user_id=claims.user_id, after=after,
                first_page=first_page, hub=hub, subscription=subscription,
                replay_log=replay_log,
                resubscribe_timeout=settings.gateway_subscribe_timeout_seconds,
                counters=counters)
            opened = True
        except RedisError as exc:
            log.warning("stream of turn %s refused, Redis failed: %s", message_id, exc)
            return error_response(503, "event_bus_unavailable", "the turn's events are "
                                  "unavailable right now; retry shortly")
        finally:
            if not opened:
                await hub.unsubscribe(subscription)
        return EventStreamResponse(stream, ping_interval=settings.gateway_ping_interval_seconds,
                                   send_timeout=settings.gateway_send_timeout_seconds,
                                   abort=stream.overflowed)

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
        }, status_code=200 if hub_stats["redis_connected"] else 503)

    return Starlette(routes=[
        Route("/v1/turns/{message_id}/events", turn_events, methods=["GET"]),
        Route("/demo", demo, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
    ], lifespan=lifespan)
