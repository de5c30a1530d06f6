"""Turning any exception raised while handling a request (gRPC or CoAP) into the
CitytwinError to answer with, logging the ones that are not the caller's fault."""

from __future__ import annotations

import logging

import asyncpg
from tortoise.exceptions import DBConnectionError

from twin.errors import CitytwinError, Unavailable

log = logging.getLogger(__name__)

# Failures of the database connection, not of the request: the caller should retry.
_INFRASTRUCTURE_ERRORS = (
    OSError,
    DBConnectionError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.InvalidCatalogNameError,
)


def as_service_error(exc: BaseException, where: str) -> CitytwinError:
    """The error to report for `exc` raised while handling `where` (an RPC or a CoAP path):
    itself if it is a CitytwinError, UNAVAILABLE for a lost database, else an internal error
    whose details go to the log only."""
    if isinstance(exc, CitytwinError):
        return exc
    if isinstance(exc, _INFRASTRUCTURE_ERRORS):
        log.warning("database unavailable", extra={"where": where, "error": repr(exc)})
        return Unavailable("the database is unavailable; retry later")
    log.error("unexpected error", extra={"where": where}, exc_info=exc)
    return CitytwinError("internal error; the server log has the details")
