"""The schema comes from Alembic migrations, on SQLite and PostgreSQL, and matches the models."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from tests.conftest import ROOT, base_settings, settings_env
from worker.migrate import current_revision, head_revision, upgrade
from worker.store import Base, SessionStore, make_engine


def _tables_of_the_first_revision_without_alembic(engine: Any) -> None:
    """How the store made its tables before Alembic: revision 0001's, and no version table."""
    upgrade(engine, "0001")
    with engine.begin() as connection:
        connection.execute(text("DROP TABLE alembic_version"))


def test_migrations_create_exactly_the_schema_the_models_describe(database_url: str) -> None:
    engine = make_engine(database_url, pool_size=1)
    try:
        upgrade(engine)
        with engine.connect() as connection:
            differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
        assert differences == []
        assert current_revision(engine) == head_revision()
    finally:
        engine.dispose()


def test_upgrading_twice_is_harmless_and_keeps_data(database_url: str) -> None:
    engine = make_engine(database_url, pool_size=1)
    try:
        store = SessionStore(engine)
        store.create_schema()
        tables = set(inspect(engine).get_table_names())
        store.create_schema()
        assert {"conversation_snapshots", "assistant_messages", "alembic_version"} <= tables
        assert set(inspect(engine).get_table_names()) == tables
    finally:
        engine.dispose()


def test_the_migrate_command_upgrades_the_configured_database(tmp_path: Path) -> None:
    settings = base_settings(database_url=f"sqlite:///{tmp_path / 'fresh.sqlite3'}")
    env = {**settings_env(settings), "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}

    finished = subprocess.run([sys.executable, "-m", "worker.migrate"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=60)

    assert finished.returncode == 0, finished.stderr
    assert f"revision {head_revision()}" in finished.stdout
    engine = make_engine(settings.database_url, pool_size=1)
    try:
        assert current_revision(engine) == head_revision()
    finally:
        engine.dispose()


def test_a_schema_made_before_migrations_is_adopted_and_upgraded(database_url: str) -> None:
    engine = make_engine(database_url, pool_size=1)
    try:
        _tables_of_the_first_revision_without_alembic(engine)

        SessionStore(engine).create_schema()

        assert current_revision(engine) == head_revision()
    finally:
        engine.dispose()


def test_a_schema_with_an_empty_revision_table_is_adopted_too(database_url: str) -> None:
    engine = make_engine(database_url, pool_size=1)
    try:
        _tables_of_the_first_revision_without_alembic(engine)
        with engine.begin() as connection:  # what an interrupted first upgrade can leave
            connection.execute(text("CREATE TABLE alembic_version "
                                    "(version_num VARCHAR(32) NOT NULL PRIMARY KEY)"))

        SessionStore(engine).create_schema()

        assert current_revision(engine) == head_revision()
    finally:
        engine.dispose()


def test_upgrading_gives_each_stored_conversation_the_owner_of_its_first_message(
        database_url: str) -> None:
    engine = make_engine(database_url, pool_size=1)
    try:
        upgrade(engine, "0001")
        insert = text(
            "INSERT INTO assistant_messages (message_id, conversation_id, tenant_id, app_id, "
            "user_id, task_id, query, status, run_count, attempts, created_at, updated_at) "
            "VALUES (:m, :c, :t, 'app-1', :u, 'task', 'q', 'succeeded', 1, 1, :at, :at)")
        with engine.begin() as connection:
            for message, conversation, tenant, user, at in [
                ("m2", "conv-a", "tenant-b", "user-b", "2026-01-02 00:00:00+00:00"),
                ("m1", "conv-a", "tenant-a", "user-a", "2026-01-01 00:00:00+00:00"),
                ("m3", "conv-b", "tenant-b", "user-b", "2026-01-03 00:00:00+00:00"),
            ]:
                connection.execute(insert, {"m": message, "c": conversation, "t": tenant,
                                            "u": user, "at": at})

        upgrade(engine)

        with engine.connect() as connection:
            owners = connection.execute(text(
                "SELECT conversation_id, tenant_id, user_id FROM conversations "
                "ORDER BY conversation_id")).all()
        assert [tuple(row) for row in owners] == [("conv-a", "tenant-a", "user-a"),
                                                  ("conv-b", "tenant-b", "user-b")]
    finally:
        engine.dispose()
