"""API bearer tokens: issuing them and recognising them. Only a SHA-256 of each is stored;
tokens carry 256 random bits, so a fast hash is enough (nothing to brute-force)."""

from __future__ import annotations

import hashlib
import secrets
import time
from datetime import UTC, datetime

from twin.access import Principal, Role, parse_scope
from twin.errors import Unauthenticated
from twin.models import ApiToken

TOKEN_PREFIX = "ctk_"
# Long enough to spare the database on every call, short enough that a revocation bites fast.
_CACHE_SECONDS = 5.0
_cache: dict[str, tuple[float, Principal]] = {}


def hash_token(token: str) -> str:
    """The stored form of a token."""
    return hashlib.sha256(token.encode()).hexdigest()


async def create_token(role: Role, scope: str = "", description: str = "") -> str:
    """Store a new token and return its secret, which is shown once and never again."""
    parse_scope(scope)
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    await ApiToken.create(
        token_hash=hash_token(token),
        role=role.value,
        scope=scope,
        description=description,
        created_at=datetime.now(UTC),
    )
    return token


async def authenticate(token: str) -> Principal:
    """The Principal a bearer token stands for; Unauthenticated if it is unknown or revoked."""
    now = time.monotonic()
    cached = _cache.get(token)
    if cached and cached[0] > now:
        return cached[1]
    if not token.startswith(TOKEN_PREFIX) or len(token) > 128:
        raise Unauthenticated("malformed bearer token")
    row = await ApiToken.get_or_none(token_hash=hash_token(token), revoked_at=None)
    if row is None:
        raise Unauthenticated("unknown or revoked bearer token")
    principal = Principal(token_id=row.id, role=Role(row.role), scope=parse_scope(row.scope))
    if len(_cache) > 10_000:
        _cache.clear()
    _cache[token] = (now + _CACHE_SECONDS, principal)
    return principal


async def revoke_token(token_id: int) -> bool:
    """Revoke a token by id; False if there is no such live token."""
    updated = await ApiToken.filter(id=token_id, revoked_at=None).update(
        revoked_at=datetime.now(UTC)
    )
    return updated > 0


async def list_tokens() -> list[ApiToken]:
    """Every token, newest first (hashes only)."""
    return await ApiToken.all().order_by("-id")
