"""Shared test harness: real server processes on loopback, on SQLite and on PostgreSQL.

Every database-backed test is parametrised over `backend`: SQLite always, PostgreSQL when
CITYTWIN_TEST_PG holds a DSN (each server gets a fresh database created from it).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from citytwin.v1 import (
    alarms_pb2_grpc,
    devices_pb2_grpc,
    firmware_pb2_grpc,
    profiles_pb2_grpc,
    provisioning_pb2_grpc,
    twins_pb2_grpc,
)

if TYPE_CHECKING:
    from tests.coap_devices import Site

PG_DSN = os.environ.get("CITYTWIN_TEST_PG", "")
BACKENDS = ["sqlite", "postgres"] if PG_DSN else ["sqlite"]
ROLES = ("admin", "service", "installer", "release-engineer", "viewer")


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pg_admin(sql: str) -> None:
    async def run() -> None:
        conn = await asyncpg.connect(PG_DSN)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run())


@dataclass
class Database:
    """A database for one test's servers; `url` is what CITYTWIN_DB gets."""

    url: str
    home: Path
    _pg_name: str = ""

    def drop(self) -> None:
        if self._pg_name:
            _pg_admin(f'DROP DATABASE IF EXISTS "{self._pg_name}" WITH (FORCE)')


def new_database(backend: str, home: Path) -> Database:
    """A fresh, empty database on `backend`."""
    home.mkdir(parents=True, exist_ok=True)
    if backend == "sqlite":
        return Database(url=f"sqlite://{home / 'citytwin.sqlite3'}", home=home)
    name = f"citytwin_test_{secrets.token_hex(4)}"
    _pg_admin(f'CREATE DATABASE "{name}"')
    parts = urllib.parse.urlsplit(PG_DSN)
    return Database(
        url=urllib.parse.urlunsplit(parts._replace(path=f"/{name}")), home=home, _pg_name=name
    )


def run_cli(db: Database, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `citytwin ARGS` against the database, as a separate process."""
    env = {**os.environ, "CITYTWIN_DB": db.url, "CITYTWIN_HOME": str(db.home)}
    return subprocess.run(
        [sys.executable, "-m", "twin", *args],
        env=env,
        capture_output=True,
        text=True,
        check=check,
        timeout=60,
    )


@dataclass
class Server:
    """One `citytwin serve` process on loopback."""

    db: Database
    extra_env: dict[str, str] = field(default_factory=dict)
    tls_root: bytes | None = None
    grpc_port: int = 0
    coap_port: int = 0
    coaps_port: int = 0
    process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self) -> Server:
        self.grpc_port = free_port()
        self.coap_port = free_port(socket.SOCK_DGRAM)
        self.coaps_port = free_port()
        env = {
            **os.environ,
            "CITYTWIN_DB": self.db.url,
            "CITYTWIN_HOME": str(self.db.home),
            "CITYTWIN_GRPC_ADDRESS": self.address,
            "CITYTWIN_COAP_HOST": "127.0.0.1",
            "CITYTWIN_COAP_PORT": str(self.coap_port),
            "CITYTWIN_COAPS_PORT": str(self.coaps_port),
            # Every test connects from 127.0.0.1: throttling is tested on servers of its own.
            "CITYTWIN_ENROLL_MAX_FAILURES": "100000",
            # Campaigns move in seconds rather than minutes.
            "CITYTWIN_CAMPAIGN_PASS": "0.2",
            "CITYTWIN_CAMPAIGN_JOIN_SCAN": "1",
            **self.extra_env,
        }
        log = open(self.db.home / f"server-{self.grpc_port}.log", "wb")  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-m", "twin", "serve"], env=env, stdout=log, stderr=log
        )
        self._wait_ready()
        return self

    def _wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        channel = (
            grpc.secure_channel(self.address, grpc.ssl_channel_credentials(self.tls_root))
            if self.tls_root
            else grpc.insecure_channel(self.address)
        )
        with channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                assert self.process and self.process.poll() is None, self.log_text()
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.1)
        raise TimeoutError(f"server did not become ready:\n{self.log_text()}")

    def log_text(self) -> str:
        logs = sorted(self.db.home.glob(f"server-{self.grpc_port}.log"))
        return logs[0].read_text(errors="replace") if logs else ""

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def kill(self) -> None:
        """Stop abruptly, as a crash would."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


class Api:
    """Typed stubs on a channel, calling with one token."""

    def __init__(self, channel: grpc.Channel, token: str | None) -> None:
        self.devices = devices_pb2_grpc.DeviceServiceStub(channel)
        self.twins = twins_pb2_grpc.TwinServiceStub(channel)
        self.profiles = profiles_pb2_grpc.ProfileServiceStub(channel)
        self.provisioning = provisioning_pb2_grpc.ProvisioningServiceStub(channel)
        self.alarms = alarms_pb2_grpc.AlarmServiceStub(channel)
        self.firmware = firmware_pb2_grpc.FirmwareServiceStub(channel)
        self.campaigns = firmware_pb2_grpc.CampaignServiceStub(channel)
        self.metadata: list[tuple[str, str]] = (
            [("authorization", f"Bearer {token}")] if token else []
        )

    def call(self, method: Any, request: Any, **kwargs: Any) -> Any:
        """Call a unary (or streaming) method with this Api's token."""
        kwargs.setdefault("timeout", 30)
        return method(request, metadata=self.metadata, **kwargs)


@dataclass
class Deployment:
    """A running server with a token per role, and helpers to call it."""

    backend: str
    db: Database
    server: Server
    tokens: dict[str, str]
    channel: grpc.Channel

    def api(self, role: str = "admin", token: str | None = None) -> Api:
        return Api(self.channel, token if token is not None else self.tokens[role])

    def token(self, role: str, scope: str = "") -> str:
        return run_cli(self.db, "token", "create", "--role", role, "--scope", scope).stdout.strip()


def _issue_tokens(db: Database) -> dict[str, str]:
    return {role: run_cli(db, "token", "create", "--role", role).stdout.strip() for role in ROLES}


@pytest.fixture(scope="session", params=BACKENDS)
def deployment(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    """One server per backend for the whole session, shared by tests that tolerate others'
    devices (each test uses its own device ids and labels)."""
    backend = request.param
    db = new_database(backend, tmp_path_factory.mktemp(f"shared-{backend}"))
    tokens = _issue_tokens(db)
    server = Server(db).start()
    channel = grpc.insecure_channel(server.address)
    try:
        yield Deployment(backend, db, server, tokens, channel)
    finally:
        channel.close()
        server.stop()
        db.drop()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The database backend of a test that starts its own servers."""
    return str(request.param)


@pytest.fixture
def fresh_db(backend: str, tmp_path: Path) -> Iterator[Database]:
    """A fresh database for a test that starts its own servers."""
    db = new_database(backend, tmp_path / "home")
    try:
        yield db
    finally:
        db.drop()


def unique(prefix: str) -> str:
    """A device id / label value no other test uses."""
    return f"{prefix}-{secrets.token_hex(4)}"


@pytest.fixture
def site(deployment: Deployment) -> Site:
    """The shared server, as devices see it."""
    from tests.coap_devices import Site, fleet_trust

    return Site(deployment.server, deployment.api("admin"), fleet_trust(deployment.db))


@pytest.fixture
def own_site(fresh_db: Database, request: pytest.FixtureRequest) -> Iterator[Site]:
    """A server of the test's own, configured by the test's `server_env` marker."""
    from tests.coap_devices import Site, fleet_trust

    marker = request.node.get_closest_marker("server_env")
    env = dict(marker.args[0]) if marker else {}
    token = run_cli(fresh_db, "token", "create", "--role", "admin").stdout.strip()
    server = Server(fresh_db, extra_env=env).start()
    channel = grpc.insecure_channel(server.address)
    try:
        yield Site(server, Api(channel, token), fleet_trust(fresh_db))
    finally:
        channel.close()
        server.stop()
