"""Run the fault scenarios against real processes and write docs/faults.md from the results.

Every row of the table is a pytest case that ran just now (real Redis, PostgreSQL or SQLite, the
stub backend on a socket and real Celery worker processes): the table is measured, not written.
"""

from __future__ import annotations

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
FAULT_MODULES = ["tests/test_faults.py", "tests/test_ownership.py", "tests/test_tasks.py",
                 "tests/test_supervisor.py"]
SECTIONS = {
    "test_faults": "Crashes, outages and bad input",
    "test_ownership": "Another owner's conversation or message",
    "test_tasks": "Backend faults and retries",
    "test_supervisor": "Stop, deadline and turn order",
}


def run(junit: Path) -> int:
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
