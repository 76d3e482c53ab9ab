"""``python -m bench.publish_designs``: what a published event costs Redis, by design.

Issue 15 asks for Redis commands per turn at most twice the relay's, whose one command per event
is a bare ``PUBLISH``. The worker's event is logged and published in one script, numbered gap-free,
guarded against a resend and fenced by the lease (worker/publisher.py), five commands as Redis
counts them. This probe sends the same events, on a Redis of its own, through:

- ``today``: the worker's own publish script, as a turn's publisher calls it between TTL
  refreshes (``EVALSHA``, ``MGET`` of head and lease, ``XADD``, ``SET`` of the head, ``PUBLISH``);
- ``client seq``: a candidate with the seq kept by the worker under its lease, the stream's id
  order as the resend guard (an ``XADD`` whose id is not above the last is refused, so a resent
  event is not published twice) and the lease read for the fence (four commands);
- ``no fence``: the same without the lease read (three: the least for an event that is both
  logged and published atomically);
- ``relay``: a bare ``PUBLISH`` (what ``bench.relay`` sends).

Each design publishes ``--events`` events, ``--per-turn`` to a turn (its own keys, a lease
set first), the turns taking turns as concurrent turns do, ``--batch`` events a round trip (1:
each its own, as a turn's publisher sends an event alone; more: pipelined, as the publisher's
group commit sends the events of turns that publish together, and as the relay sends); designs
alternate for ``--rounds`` rounds. Per event it reports the commands Redis counted, the Redis
server's CPU and this process's CPU. Each design's log is checked afterwards: a turn holds every
seq once. The candidates are measured here only; the worker does not use them.
"""

from __future__ import annotations

import argparse
import tempfile
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import redis

from bench.metrics import commands_delta, process_cpu_seconds
from bench.probes import command_stats, server_cpu_seconds
from bench.procs import start_private_redis
from worker.publisher import _PUBLISH_SCRIPT

_CLIENT_SEQ_SCRIPT = """
if redis.call('GET', KEYS[2]) ~= ARGV[3] then return redis.error_reply('FENCED') end
local added = redis.pcall('XADD', KEYS[1], 'MAXLEN', '~', ARGV[4], ARGV[5] .. '-0',
                          'data', ARGV[2], 'k', 't')
if type(added) == 'table' and added.err then return 0 end
redis.call('PUBLISH', ARGV[1], ARGV[2])
return 1
"""

_NO_FENCE_SCRIPT = """
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[4], ARGV[5] .. '-0', 'data', ARGV[2], 'k', 't')
redis.call('PUBLISH', ARGV[1], ARGV[2])
return 1
"""

LOG_BOUND = 10_000
LEASE_TOKEN = "bench-lease"
# An answer delta as the worker publishes it, without its closing brace and seq.
MESSAGE_HEAD = ('{"event":"agent_message","conversation_id":"c","message_id":"m",'
                '"task_id":"t","answer":"a token or two"')

Publish = Callable[[redis.Redis, str, int], None]


@dataclass
class Cost:
    design: str
    events: int
    commands: int
    redis_cpu: float
    client_cpu: float

    def row(self) -> str:
        per = 1e6 / self.events
        return (f"| {self.design} | {self.commands / self.events:.2f} | "
                f"{self.redis_cpu * per:.1f} | {self.client_cpu * per:.1f} |")


def designs(client: redis.Redis) -> dict[str, tuple[Publish, bool]]:
    """Each design's publish of one event (turn key, seq), and whether it keeps a log."""
    today = client.register_script(_PUBLISH_SCRIPT)
    client_seq = client.register_script(_CLIENT_SEQ_SCRIPT)
    no_fence = client.register_script(_NO_FENCE_SCRIPT)
    for script in (today, client_seq, no_fence):
        client.script_load(script.script)  # so that no design's count has an EVAL fallback

    def publish_today(target: redis.Redis, turn: str, seq: int) -> None:
        today(client=target, keys=[f"head:{turn}", f"log:{turn}", f"lease:{turn}"],
              args=[f"channel:{turn}", MESSAGE_HEAD, "", "", LOG_BOUND, f"publish-{seq}",
                    LEASE_TOKEN, "t", ""])

    def publish_client_seq(target: redis.Redis, turn: str, seq: int) -> None:
        client_seq(client=target, keys=[f"log:{turn}", f"lease:{turn}"],
                   args=[f"channel:{turn}", f'{MESSAGE_HEAD},"seq":{seq}}}', LEASE_TOKEN,
                         LOG_BOUND, seq])

    def publish_no_fence(target: redis.Redis, turn: str, seq: int) -> None:
        no_fence(client=target, keys=[f"log:{turn}"],
                 args=[f"channel:{turn}", f'{MESSAGE_HEAD},"seq":{seq}}}', "", LOG_BOUND, seq])

    def publish_relay(target: redis.Redis, turn: str, seq: int) -> None:
        target.publish(f"channel:{turn}", f'{MESSAGE_HEAD},"seq":{seq}}}')

    return {"today (worker/publisher.py)": (publish_today, True),
            "client seq, fenced": (publish_client_seq, True),
            "no fence": (publish_no_fence, True),
            "relay (PUBLISH)": (publish_relay, False)}


def measure(client: redis.Redis, design: str, publish: Publish, keeps_log: bool, *,
            events: int, per_turn: int, batch: int) -> Cost:
    turns = [uuid.uuid4().hex for _ in range(max(1, events // per_turn))]
    for turn in turns:
        client.set(f"lease:{turn}", LEASE_TOKEN)
    before_commands, before_redis = command_stats(client), server_cpu_seconds(client)
    before_client = process_cpu_seconds()
    target = client if batch == 1 else client.pipeline(transaction=False)
    sent = 0
    for seq in range(1, per_turn + 1):
        for turn in turns:
            publish(target, turn, seq)
            sent += 1
            if batch > 1 and sent % batch == 0:
                target.execute()
    if batch > 1:
        target.execute()
    client_cpu = process_cpu_seconds() - before_client
    redis_cpu = server_cpu_seconds(client) - before_redis
    counted = commands_delta(before_commands, command_stats(client))
    commands = sum(counted.values())
    if keeps_log:
        for turn in turns:
            ids = [entry_id.decode() for entry_id, _ in client.xrange(f"log:{turn}")]
            if ids != [f"{seq}-0" for seq in range(1, per_turn + 1)]:
                raise RuntimeError(f"{design}: turn {turn} logged {len(ids)} events, not "
                                   f"seqs 1..{per_turn} once each")
    return Cost(design, sent, commands, redis_cpu, client_cpu)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.publish_designs",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000, help="events per design per round")
    parser.add_argument("--per-turn", type=int, default=100, help="events per turn")
    parser.add_argument("--batch", type=int, default=1, help="events per round trip")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    if min(args.events, args.per_turn, args.batch, args.rounds) < 1:
        parser.error("--events, --per-turn, --batch and --rounds must be at least 1")
    with tempfile.TemporaryDirectory() as scratch:
        server, port = start_private_redis(Path(scratch))
        try:
            client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=10)
            print("| design | Redis commands per event | Redis CPU per event, µs "
                  "| client CPU per event, µs |")
            print("| --- | --- | --- | --- |")
            for _ in range(args.rounds):
                for design, (publish, keeps_log) in designs(client).items():
                    client.flushall()
                    cost = measure(client, design, publish, keeps_log,
                                   events=args.events, per_turn=args.per_turn,
                                   batch=args.batch)
                    print(cost.row(), flush=True)
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
