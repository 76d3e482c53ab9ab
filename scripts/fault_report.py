"""Run the fault scenarios against real processes and write docs/faults.md from the results.

Every row of the table is a pytest case that ran just now (real Redis, PostgreSQL or SQLite, the
stub backend on a socket and real Celery worker processes): the table is measured, not written.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ElementTree
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FAULT_MODULES = ["tests/test_faults.py", "tests/test_takeover.py", "tests/test_ownership.py",
                 "tests/test_tasks.py", "tests/test_supervisor.py"]
SECTIONS = {
    "test_faults": "Crashes, outages and bad input",
    "test_takeover": "A dead or paused worker's turns taken over",
    "test_ownership": "Another owner's conversation or message",
    "test_tasks": "Backend faults and retries",
    "test_supervisor": "Stop, deadline and turn order",
}


# What each hostile case of issue 12 now ends in; every row is asserted by the tests named.
HOSTILE_CASES = [
    "## Hostile input and other owners: the cases and what they end in",
    "",
    "| case | outcome | tested by |",
    "| --- | --- | --- |",
    "| tenant B names tenant A's conversation | one `error` `conversation_not_found` (404) on "
    "B's refusal stream; no run, A's snapshot and messages untouched | test_ownership: "
    "another owners conversation |",
    "| B names A's finished message id | refused the same way; A's channel gets nothing, no "
    "replay of A's answer | test_ownership: finished message id |",
    "| B names A's running message id | refused; A's stream has one end, every delta once | "
    "test_ownership: running message id |",
    "| B's token for A's message at the gateway | only B's own refusal, never a frame of A's "
    "turn | test_gateway: another owners token |",
    "| lone surrogate in `conversation_id` with a valid `message_id` | one `invalid_param`, "
    "the id left out of the event | test_faults: invalid conversation id |",
    "| lone surrogate or NUL or control characters in the query, prompt, stop words or "
    "`inputs` | one `invalid_param`, no row (SQLite and PostgreSQL) | test_faults: bad payload "
    "|",
    "| `schema_version: true`, `inputs` nested 40 deep | one `invalid_param` | test_faults: bad "
    "payload |",
    "| body not JSON, `kwargs` a list, nesting 10,000 deep | task FAILURE in the result "
    "backend, one bounded log line, never PENDING; the worker serves the next turn | "
    "test_faults: cannot be read |",
    "| key with `\\n` and a fake log line; 60 KB id | escaped and cut in the log; refusal "
    "≤ 1,000 characters | test_faults: forge, excerpt; test_logs |",
    "| gateway path with `%0D%0A`; 6,000-character id | escaped, cut at 512 | test_gateway: "
    "forge |",
    "| `after=999` / `Last-Event-ID` past a finished turn's end | 204 at once | test_gateway: "
    "resume point at or past the end |",
    "| `Last-Event-ID` of 2^64+1 or 4,000 digits, `+2`, ` 3 `, `1_0` | 400 `invalid_param` | "
    "test_gateway: not a strict seq |",
    "| a token for a turn that never publishes | `turn_not_started` frame after the wait | "
    "test_gateway: never starts |",
    "| HEAD on a live turn | headers at once | test_gateway: head |",
    "| 240 generated hostile payloads | one terminal event per usable id, no row when "
    "invalid, nothing across owners | test_faults: generated hostile payloads |",
    "",
]


ARTIFACTS = ROOT / "artifacts"
TAKEOVER_SCENARIOS = {
    "redis-live-run": "20 turns mid-stream, worker SIGKILLed, backend runs still streaming "
                      "(Redis broker)",
    "redis-finished-run": "10 turns mid-stream, worker SIGKILLed, backend runs finished before "
                          "the takeover (Redis broker)",
    "redis-prefetched": "8 turns on 2 slots, worker SIGKILLed: 2 running, the held message "
                        "and the queued ones (Redis broker)",
    "rabbitmq": "10 turns mid-stream, worker SIGKILLed (RabbitMQ broker)",
}


def takeover_timings() -> list[str]:
    """The kill → next event distribution each takeover test recorded in this run."""
    lines = ["## Kill → next event on the turn's channel", "",
             "Measured by tests/test_takeover.py in this run: from the SIGKILL to each turn's "
             "next event at a subscriber of its channel, with the default lease (3 s), scan "
             "(0.5 s) and visibility timeout (900 s). Target: p99 ≤ 5 s.", "",
             "| scenario | turns | p50 s | p99 s | max s | broker |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, title in TAKEOVER_SCENARIOS.items():
        path = ARTIFACTS / f"takeover-{name}.json"
        if not path.exists():
            lines.append(f"| {title} | not run | | | | |")
            continue
        data = json.loads(path.read_text())
        lines.append(f"| {title} | {data['turns']} | {data['p50_s']:.2f} | {data['p99_s']:.2f} "
                     f"| {data['max_s']:.2f} | {data['broker']} |")
    return [*lines, ""]


def run(junit: Path) -> int:
    for stale in ARTIFACTS.glob("takeover-*.json"):
        stale.unlink()
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
               f"--junitxml={junit}", *FAULT_MODULES]
    return subprocess.run(command, cwd=ROOT, check=False).returncode


def scenario(name: str) -> tuple[str, str]:
    """'test_x_y[sqlite-503]' -> ('x y', 'sqlite-503')."""
    match = re.fullmatch(r"test_(?P<what>[^\[]+)(?:\[(?P<params>.*)\])?", name)
    if match is None:
        return name, ""
    return match["what"].replace("_", " "), match["params"] or ""


def render(junit: Path, exit_code: int) -> str:
    rows: dict[str, list[str]] = defaultdict(list)
    totals = {"passed": 0, "failed": 0, "skipped": 0}
    for case in ElementTree.parse(junit).getroot().iter("testcase"):
        module = case.get("classname", "").rsplit(".", 1)[-1]
        if case.find("failure") is not None or case.find("error") is not None:
            outcome = "**failed**"
            totals["failed"] += 1
        elif case.find("skipped") is not None:
            outcome = "skipped"
            totals["skipped"] += 1
        else:
            outcome = "passed"
            totals["passed"] += 1
        what, params = scenario(case.get("name", ""))
        rows[module].append(f"| {what} | {params} | {outcome} | {float(case.get('time', 0)):.2f} |")
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Fault results",
        "",
        f"Produced by `scripts/fault-report` on {stamp} (pytest exit code {exit_code}): "
        f"{totals['passed']} passed, {totals['failed']} failed, {totals['skipped']} skipped, "
        f"workers on the {os.environ.get('AGENT_TURN_TEST_POOL', 'gevent')} pool.",
        "Each row ran against real processes; the scenario is the test's name, the parameters "
        "name the database (`sqlite`, `postgresql`) and the case. A pass means the turn ended in "
        "a completed answer or exactly one `error` event, with no half-written row, as the test "
        "asserts.",
        "",
    ]
    lines += HOSTILE_CASES
    lines += takeover_timings()
    for module, title in SECTIONS.items():
        if not rows.get(module):
            continue
        lines += [f"## {title}", "", "| scenario | parameters | result | seconds |",
                  "| --- | --- | --- | --- |", *rows[module], ""]
    return "\n".join(lines)


def main() -> int:
    with tempfile.TemporaryDirectory() as scratch:
        junit = Path(scratch) / "faults.xml"
        exit_code = run(junit)
        if not junit.exists():
            print("pytest produced no report; see its output above", file=sys.stderr)
            return exit_code or 1
        (ROOT / "docs" / "faults.md").write_text(render(junit, exit_code))
    print("wrote docs/faults.md")
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
