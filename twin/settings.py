"""Service configuration, read once from the environment.

Every setting has a default that gives the embedded single-node service: SQLite under
`./var` (or `$CITYTWIN_HOME`), gRPC on 127.0.0.1:50051, CoAP on UDP 5683.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Settings:
    """What one citytwin process needs to know to run."""

    home: Path
    db_url: str
    grpc_address: str
    coap_host: str
    coap_port: int
    tls_cert: Path | None
    tls_key: Path | None
    feed_retention_seconds: int
    log_level: str
    # Protects the fleet CA's private keys; None means the key file under `home`.
    ca_passphrase: str | None = field(default=None, repr=False)

    @property
    def is_postgres(self) -> bool:
        """Whether the database is PostgreSQL (otherwise SQLite)."""
        return self.db_url.startswith(("postgres://", "postgresql://", "asyncpg://"))


def _optional_path(value: str | None) -> Path | None:
    return Path(value) if value else None


def load_settings(env: dict[str, str] | None = None) -> Settings:
    """Build Settings from `env` (default: the process environment)."""
    env = dict(os.environ if env is None else env)
    home = Path(env.get("CITYTWIN_HOME", "var")).resolve()
    db_url = env.get("CITYTWIN_DB") or f"sqlite://{home / 'citytwin.sqlite3'}"
    cert, key = (
        _optional_path(env.get("CITYTWIN_TLS_CERT")),
        _optional_path(env.get("CITYTWIN_TLS_KEY")),
    )
    if (cert is None) != (key is None):
        raise SystemExit("CITYTWIN_TLS_CERT and CITYTWIN_TLS_KEY must be set together")
    return Settings(
        home=home,
        db_url=db_url,
        grpc_address=env.get("CITYTWIN_GRPC_ADDRESS", "127.0.0.1:50051"),
        coap_host=env.get("CITYTWIN_COAP_HOST", "::"),
        coap_port=int(env.get("CITYTWIN_COAP_PORT", "5683")),
        tls_cert=cert,
        tls_key=key,
        feed_retention_seconds=int(env.get("CITYTWIN_FEED_RETENTION", str(7 * 24 * 3600))),
        log_level=env.get("CITYTWIN_LOG_LEVEL", "WARNING"),
        ca_passphrase=env.get("CITYTWIN_CA_PASSPHRASE") or None,
    )
