"""``python -m stub_backend``: serve the stub as its own process.

Flags override the ``STUB_*`` environment variables, which override the defaults, so a demo
script can configure the stub either way. The listening URL is printed once the socket is bound
(useful with ``--port 0``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import sys

from stub_backend.app import create_app
from stub_backend.server import bind_socket, build_uvicorn_server
from stub_backend.settings import StubSettings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m stub_backend", description="Serve the dify-agent stub."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8790, help="0 picks a free port")
    parser.add_argument("--token-delay", type=float, help="seconds between answer tokens")
    parser.add_argument("--answer-tokens", type=int, help="pad answers to this many tokens")
    parser.add_argument("--keepalive-interval", type=float, help="seconds between keepalives")
    parser.add_argument("--auth-token", help="require this bearer token on the run API")
    parser.add_argument("--no-gc-pauses", action="store_true",
                        help="no automatic garbage collection (for benchmarks); "
                             "DELETE /_stub/state collects")
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> StubSettings:
    """Environment first, then the flags that were actually given."""
    overrides = {
        name: value
        for name, value in {
            "token_delay": args.token_delay,
            "answer_tokens": args.answer_tokens,
            "keepalive_interval": args.keepalive_interval,
            "auth_token": args.auth_token,
        }.items()
        if value is not None
    }
    return dataclasses.replace(StubSettings.from_env(), **overrides)


LISTEN_BACKLOG = 2048


def stop_collector_pauses() -> None:
    """Keep the garbage collector from pausing the stub between stamping an event and sending it.

    The stub keeps every run's events, so its full collections grow with the load and reach
    ~100 ms at 200 runs x 100 tokens: every stream then stalls at once, and a benchmark charges
    the stall to whoever reads the events. Start-up objects are frozen and automatic collection
    is off; the reset endpoint collects, between a benchmark's phases.
    """
    gc.collect()
    gc.freeze()
    gc.disable()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = settings_from(args)
    if args.no_gc_pauses:
        stop_collector_pauses()
    sock = bind_socket(args.host, args.port)
    # Listening before the line below is printed: whoever waits for the line (scripts, the
    # benchmark) connects at once, and a bound socket that does not listen yet refuses them.
    # Connections made before uvicorn starts wait in the backlog.
    sock.listen(LISTEN_BACKLOG)
    port = sock.getsockname()[1]
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"stub_backend listening on http://{host}:{port}", flush=True)
    server = build_uvicorn_server(create_app(settings))
    # uvicorn re-raises a captured SIGINT after its graceful stop; that stop was the point.
    with contextlib.suppress(KeyboardInterrupt):
        server.run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
