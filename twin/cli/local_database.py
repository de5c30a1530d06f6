"""Commands that work on the database directly (tokens, the CA), not through the API."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from twin.database import close_database, open_database
from twin.settings import load_settings


def with_database(work: Callable[[], Awaitable[Any]]) -> Any:
    """Open the configured database (migrating it if needed), run `work`, close it."""

    async def run() -> Any:
        await open_database(load_settings().db_url)
        try:
            return await work()
        finally:
            await close_database()

    return asyncio.run(run())
