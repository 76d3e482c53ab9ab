"""``python -m gateway``: serve the gateway; ``python -m gateway demo-turn``: try it in a browser.

``demo-turn`` enqueues a turn as a web tier would (a worker must be running, see ``Procfile``)
and prints the demo page's link with the turn's id and stream token.
"""

from __future__ import annotations

import argparse
import logging
import logging.config
from typing import Any

import uvicorn

from config.settings import get_settings
from gateway.app import create_app
from worker.logs import install_safe_log_records

# The log set-up of every gateway process (uvicorn applies it in each worker it starts).
LOG_CONFIG = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"level": "INFO", "handlers": ["stderr"]},
    "loggers": {"uvicorn": {"level": "INFO", "handlers": [], "propagate": True}},
}


def serve(host: str, port: int, workers: int = 1) -> None:
    """One process, or ``workers`` of them sharing the listening socket (uvicorn's workers, as
    production runs it): each has its own pub/sub connection and log-read pool, and the
    kernel spreads the connections among them. Any process can serve any turn."""
    # Before any handler exists: every record of the process (the app's, uvicorn's) is then
    # made safe where it is made, so a path or token value with a line break in it cannot
    # forge a log line, and a 60 KB one cannot flood it (worker/logs.py). create_app does the
    # same in each worker process.
    install_safe_log_records()
    logging.config.dictConfig(LOG_CONFIG)
    # No access log: stream URLs carry tokens in their query strings. The app logs each stream
    # (turn, user, how it ended) without them.
    options: dict[str, Any] = {"host": host, "port": port, "access_log": False,
                               "lifespan": "on", "timeout_graceful_shutdown": 5,
                               "log_config": LOG_CONFIG}
    if workers > 1:
        uvicorn.run("gateway.app:create_app", factory=True, workers=workers, **options)
    else:
        uvicorn.run(create_app(), **options)


def demo_turn(query: str, user_id: str, host: str, port: int) -> None:
    from worker.client import submit_turn

    submitted = submit_turn({"tenant_id": "demo", "app_id": "demo", "user_id": user_id,
                             "query": query})
    print(f"http://{host}:{port}/demo?message_id={submitted.message_id}"
          f"&token={submitted.stream_token}")


def main() -> None:
    settings = get_settings()
    parser = argparse.ArgumentParser(prog="python -m gateway", description=__doc__)
    parser.add_argument("--host", default=settings.gateway_host)
    parser.add_argument("--port", type=int, default=settings.gateway_port)
    parser.add_argument("--workers", type=int, default=1,
                        help="gateway processes sharing the port (default 1)")
    commands = parser.add_subparsers(dest="command")
    demo = commands.add_parser("demo-turn", help="enqueue a turn and print its demo link")
    demo.add_argument("query", nargs="?", default="Tell me about streaming.")
    demo.add_argument("--user", default="demo-user")
    arguments = parser.parse_args()
    if arguments.command == "demo-turn":
        demo_turn(arguments.query, arguments.user, arguments.host, arguments.port)
    else:
        serve(arguments.host, arguments.port, arguments.workers)


if __name__ == "__main__":
    main()
