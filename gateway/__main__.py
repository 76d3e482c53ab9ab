"""``python -m gateway``: serve the gateway; ``python -m gateway demo-turn``: try it in a browser.

``demo-turn`` enqueues a turn as a web tier would (a worker must be running, see ``Procfile``)
and prints the demo page's link with the turn's id and stream token.
"""

from __future__ import annotations

import argparse
import logging

import uvicorn

from config.settings import get_settings
from gateway.app import create_app
from worker.logs import install_safe_log_records


def serve(host: str, port: int) -> None:
    # Before any handler exists: every record of the process (the app's, uvicorn's) is then
    # made safe where it is made, so a path or token value with a line break in it cannot
    # forge a log line, and a 60 KB one cannot flood it (worker/logs.py).
    install_safe_log_records()
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # No access log: stream URLs carry tokens in their query strings. The app logs each stream
    # (turn, user, how it ended) without them.
    uvicorn.run(create_app(), host=host, port=port, access_log=False, lifespan="on",
                timeout_graceful_shutdown=5)


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
    commands = parser.add_subparsers(dest="command")
    demo = commands.add_parser("demo-turn", help="enqueue a turn and print its demo link")
    demo.add_argument("query", nargs="?", default="Tell me about streaming.")
    demo.add_argument("--user", default="demo-user")
    arguments = parser.parse_args()
    if arguments.command == "demo-turn":
        demo_turn(arguments.query, arguments.user, arguments.host, arguments.port)
    else:
        serve(arguments.host, arguments.port)


if __name__ == "__main__":
    main()
