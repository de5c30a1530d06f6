"""Service configuration, read once from the environment.

Every setting has a default that gives the embedded single-node service: SQLite under
`./var` (or `$CITYTWIN_HOME`), gRPC on 127.0.0.1:50051, CoAP on UDP 5683 and
CoAP over TLS on TCP 5684.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from twin.coap_tls import MAX_CONCURRENT_HANDSHAKES


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
    # CoAP over TLS (RFC 8323) for devices. Without a certificate of the operator's, the
    # service issues itself one from the fleet CA at every start, for `coaps_names`.
    coaps_port: int = 5684
    coaps_cert: Path | None = None
    coaps_key: Path | None = None
    coaps_names: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
    coaps_max_connections: int = 10_000
    # TLS handshakes in progress at once; more connections wait in the listen backlog (so a
    # reconnect storm gets through in arrival order instead of every handshake timing out).
    coaps_max_handshakes: int = MAX_CONCURRENT_HANDSHAKES
    # Longer than the heartbeat of any always-connected device (lamps: 300 s), so a
    # connection is closed only after a missed heartbeat or two.
    coaps_idle_seconds: float = 720.0
    # Plain-CoAP enrollment, for closed on-site networks only.
    allow_coap_enrollment: bool = False
    # Failed enrollment attempts allowed per source address and per serial number per window.
    enroll_max_failures: int = 5
    enroll_failure_window_seconds: float = 300.0
    # A device silent for longer than its profile's heartbeat interval times this is offline.
    offline_tolerance: float = 2.5
    liveness_sweep_seconds: float = 5.0
    telemetry_retention_seconds: int = 30 * 24 * 3600
    # Writes (reports, telemetry, heartbeats) one device may make: a burst, then this many a
    # minute (0: no limit). See write_rate_limits.py.
    device_writes_per_minute: float = 300.0
    device_write_burst: int = 60
    # The city's time zone: local days for dimming plans.
    time_zone: ZoneInfo = field(default_factory=lambda: ZoneInfo("UTC"))
    # Firmware: the largest image accepted, and how often campaigns are driven.
    max_artifact_bytes: int = 16 * 1024 * 1024
    campaign_pass_seconds: float = 1.0
    # How long a replica may go silent before another takes over the campaigns it drives.
    campaign_lease_seconds: float = 30.0
    # How often continuous campaigns look for devices that joined their target.
    campaign_join_scan_seconds: float = 30.0

    @property
    def is_postgres(self) -> bool:
        """Whether the database is PostgreSQL (otherwise SQLite)."""
        return self.db_url.startswith(("postgres://", "postgresql://", "asyncpg://"))


def _optional_path(value: str | None) -> Path | None:
    return Path(value) if value else None


def _number(env: dict[str, str], name: str, default: float) -> float:
    text = env.get(name)
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise SystemExit(f"{name} must be a number, not {text!r}") from None
    if value < 0:
        raise SystemExit(f"{name} must not be negative")
    return value


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise SystemExit(f"CITYTWIN_TIME_ZONE {name!r} is not an IANA time zone") from None


def _pair(env: dict[str, str], cert_name: str, key_name: str) -> tuple[Path | None, Path | None]:
    cert, key = _optional_path(env.get(cert_name)), _optional_path(env.get(key_name))
    if (cert is None) != (key is None):
        raise SystemExit(f"{cert_name} and {key_name} must be set together")
    return cert, key


def load_settings(env: dict[str, str] | None = None) -> Settings:
    """Build Settings from `env` (default: the process environment)."""
    env = dict(os.environ if env is None else env)
    home = Path(env.get("CITYTWIN_HOME", "var")).resolve()
    db_url = env.get("CITYTWIN_DB") or f"sqlite://{home / 'citytwin.sqlite3'}"
    cert, key = _pair(env, "CITYTWIN_TLS_CERT", "CITYTWIN_TLS_KEY")
    coaps_cert, coaps_key = _pair(env, "CITYTWIN_COAPS_CERT", "CITYTWIN_COAPS_KEY")
    names = tuple(n.strip() for n in env.get("CITYTWIN_COAPS_NAMES", "").split(",") if n.strip())
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
        coaps_port=int(_number(env, "CITYTWIN_COAPS_PORT", 5684)),
        coaps_cert=coaps_cert,
        coaps_key=coaps_key,
        coaps_names=names or Settings.coaps_names,
        coaps_max_connections=int(_number(env, "CITYTWIN_COAPS_MAX_CONNECTIONS", 10_000)),
        coaps_max_handshakes=max(
            1, int(_number(env, "CITYTWIN_COAPS_MAX_HANDSHAKES", MAX_CONCURRENT_HANDSHAKES))
        ),
        coaps_idle_seconds=_number(env, "CITYTWIN_COAPS_IDLE_TIMEOUT", 720.0),
        allow_coap_enrollment=env.get("CITYTWIN_ALLOW_COAP_ENROLLMENT", "") in ("1", "true", "yes"),
        enroll_max_failures=int(_number(env, "CITYTWIN_ENROLL_MAX_FAILURES", 5)),
        enroll_failure_window_seconds=_number(env, "CITYTWIN_ENROLL_FAILURE_WINDOW", 300.0),
        offline_tolerance=max(1.0, _number(env, "CITYTWIN_OFFLINE_TOLERANCE", 2.5)),
        liveness_sweep_seconds=max(0.1, _number(env, "CITYTWIN_LIVENESS_SWEEP", 5.0)),
        time_zone=_zone(env.get("CITYTWIN_TIME_ZONE") or "UTC"),
        telemetry_retention_seconds=int(
            _number(env, "CITYTWIN_TELEMETRY_RETENTION", 30 * 24 * 3600)
        ),
        device_writes_per_minute=_number(env, "CITYTWIN_DEVICE_WRITES_PER_MINUTE", 300.0),
        device_write_burst=max(1, int(_number(env, "CITYTWIN_DEVICE_WRITE_BURST", 60))),
        max_artifact_bytes=int(_number(env, "CITYTWIN_MAX_ARTIFACT_BYTES", 16 * 1024 * 1024)),
        campaign_pass_seconds=max(0.05, _number(env, "CITYTWIN_CAMPAIGN_PASS", 1.0)),
        campaign_lease_seconds=max(1.0, _number(env, "CITYTWIN_CAMPAIGN_LEASE", 30.0)),
        campaign_join_scan_seconds=max(0.1, _number(env, "CITYTWIN_CAMPAIGN_JOIN_SCAN", 30.0)),
    )
