"""Creating and upgrading the session store's schema with Alembic.

``python -m worker.migrate`` (or ``scripts/migrate``) upgrades the configured database to the
newest revision; the worker does the same when it starts, so a deploy never runs against an old
schema. Several workers starting at once on PostgreSQL take turns through an advisory lock.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, inspect, text

from config.settings import get_settings
from worker.store import make_engine

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
# Any fixed 64-bit number: the key of the advisory lock that serialises concurrent upgrades.
_UPGRADE_LOCK_KEY = 7_310_224_511
_FIRST_REVISION = "0001"


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    config = alembic_config()
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"),
                               {"key": _UPGRADE_LOCK_KEY})
        config.attributes["connection"] = connection
        if _unversioned_schema(connection):
            # Made by create_all before migrations existed: the same tables as revision 0001.
            command.stamp(config, _FIRST_REVISION)
        command.upgrade(config, revision)


def _unversioned_schema(connection: Connection) -> bool:
    """The store's tables without a recorded revision (an empty alembic_version included)."""
    if "assistant_messages" not in inspect(connection).get_table_names():
        return False
    return MigrationContext.configure(connection).get_current_revision() is None


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def main() -> None:
    parser = argparse.ArgumentParser(description="Upgrade or inspect the session store schema.")
    parser.add_argument("action", choices=["upgrade", "current"], nargs="?", default="upgrade")
    args = parser.parse_args()
    settings = get_settings()
    engine = make_engine(settings.database_url, pool_size=1)
    try:
        if args.action == "upgrade":
            upgrade(engine)
        print(f"{settings.database_url.split('@')[-1]}: revision {current_revision(engine)} "
              f"(head {head_revision()})")
    finally:
        engine.dispose()


if __name__ == "__main__":
    main()
