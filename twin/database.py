"""Opening the database: tortoise configuration, migrations on start, and closing."""

from __future__ import annotations

import logging
from typing import Any

import asyncpg
from tortoise import Tortoise, connections
from tortoise.migrations.api import migrate

log = logging.getLogger(__name__)

# Apps with their models and migrations packages; packages add theirs here as they grow.
APPS: dict[str, dict[str, Any]] = {
    "twin": {"models": ["twin.models"], "migrations": "twin.migrations"},
    "provisioning": {"models": ["provisioning.models"], "migrations": "provisioning.migrations"},
    "firmware_ota": {"models": ["firmware_ota.models"], "migrations": "firmware_ota.migrations"},
}

# Held (per session) while migrating, so that replicas starting together migrate once.
_MIGRATION_LOCK_KEY = 0x63697479  # "city"


def tortoise_config(db_url: str) -> dict[str, Any]:
    """The tortoise-orm configuration for a database URL (sqlite://path or postgres://...)."""
    if db_url.startswith("postgresql://"):
        db_url = "postgres://" + db_url.removeprefix("postgresql://")
    return {
        "connections": {"default": db_url},
        "apps": {label: {**app, "default_connection": "default"} for label, app in APPS.items()},
        "use_tz": True,
        "timezone": "UTC",
    }


def is_postgres() -> bool:
    """Whether the open database is PostgreSQL."""
    dialect: str = connections.get("default").capabilities.dialect
    return dialect == "postgres"


async def open_database(db_url: str) -> None:
    """Connect, and bring the schema up to date by applying pending migrations."""
    config = tortoise_config(db_url)
    if config["connections"]["default"].startswith("postgres://"):
        # A session-level advisory lock on a connection of its own (migrate() re-initialises
        # tortoise and its pool), so that replicas starting together migrate one at a time.
        lock_conn = await asyncpg.connect(config["connections"]["default"])
        try:
            await lock_conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK_KEY)
            await migrate(config=config)
        finally:
            await lock_conn.close()
    else:
        await migrate(config=config)
    # migrate() initialises tortoise without connections; start it for real.
    await Tortoise.close_connections()
    await Tortoise.init(config=config)
    log.info("database ready")


async def close_database() -> None:
    """Close every connection tortoise opened."""
    await Tortoise.close_connections()


# For tortoise's own CLI (`make migrations`): model state only, no real database needed.
MIGRATIONS_CONFIG = tortoise_config("sqlite://:memory:")
