"""``scripts/demo`` (worker.demo): the whole stack started as a new user would, four turns."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

from stub_backend import StubServer
from tests.conftest import ROOT, base_settings, settings_env, sqlite_url


def test_the_demo_streams_a_conversation_a_tool_turn_and_a_question_answered(
    stub_server: StubServer, tmp_path: Path
) -> None:
    settings = base_settings(database_url=sqlite_url(tmp_path), backend_url=stub_server.url,
                             queue=f"demo-{uuid.uuid4().hex[:8]}")
    completed = subprocess.run(
        [sys.executable, "-m", "worker.demo"], cwd=ROOT, capture_output=True, text=True,
        timeout=120, env={**os.environ, **settings_env(settings), "PYTHONPATH": str(ROOT)})

    out = completed.stdout
    assert completed.returncode == 0, completed.stderr[-3000:] + out[-3000:]
    assert "[turn 2] You said: What did I just tell you?." in out
    assert '[step 2] tool weather({"town": "Lisbon"}) → {"sky":"sunny","celsius":21}' in out
    assert "→ unknown town 'Lisbn'" in out
    assert "[question] For what time should I book the table?" in out
    assert 'Tool ask_human said: {"status":"submitted","action":{"id":"book"' in out
    assert out.count("chunks,") == 4, "four turns, each ending in message_end"
