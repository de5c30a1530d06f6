"""Shared test harness: real server processes on loopback, on SQLite and on PostgreSQL.

Every database-backed test is parametrised over `backend`: SQLite always, PostgreSQL when
CITYTWIN_TEST_PG holds a DSN (each server gets a fresh database created from it).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import runpy
import secrets
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
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
    return citytwin_process(args, env, check=check)


# `citytwin` commands run as processes of their own, as people and scripts run them. A fresh
# interpreter spends a second (more on a busy machine) importing the service before it does
# anything, so each test worker keeps one process that has imported it all once (a zygote),
# and every command is a child forked from it: a separate process with the environment,
# arguments, working directory, standard streams and exit status it would have under
# `python -m twin`, running that same `__main__` (only the interpreter's own start-up settings,
# PYTHON* variables, are the worker's). CITYTWIN_TEST_CLI_SPAWN=1 starts each command as a
# fresh interpreter instead.
_ZYGOTE_MAIN = "import sys; sys.path[:0] = sys.argv[1:]; import tests.conftest as c; c._zygote()"


def _zygote() -> None:
    """The zygote's loop: one JSON request a line in, the child's pid and then its exit
    status a line each out; ends with its standard input."""
    import twin.cli.main  # noqa: F401  (imported once, here, for every child)

    requests, replies = sys.stdin.buffer, sys.stdout
    while line := requests.readline():
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _run_citytwin(**request)
        print(pid, file=replies, flush=True)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status), file=replies, flush=True)


def _run_citytwin(argv: list[str], env: dict[str, str], cwd: str, out: str, err: str) -> None:
    """In a forked child: `python -m twin ARGV` in `cwd` with `env`, output to `out`, `err`."""
    code = 1
    try:
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        for fd, path in ((1, out), (2, err)):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), fd)
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
        sys.argv = ["twin", *argv]
        try:
            runpy.run_module("twin", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exit_:
            # As the interpreter does: None is 0, a number is the status, anything else is
            # printed and means 1.
            if exit_.code is None or isinstance(exit_.code, int):
                code = int(exit_.code or 0)
            else:
                print(exit_.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


class _Zygote:
    """This test worker's zygote, started on first use; one command at a time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None

    def _reply(self, deadline: float | None = None) -> int | None:
        assert self._process and self._process.stdout
        pipe = self._process.stdout
        if deadline is not None:
            ready, _, _ = select.select([pipe], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                return None
        line = pipe.readline()
        if not line:
            raise RuntimeError("the citytwin zygote died")
        return int(line)

    def run(self, argv: list[str], env: dict[str, str], timeout: float) -> tuple[int, str, str]:
        with self._lock, tempfile.TemporaryDirectory(prefix="citytwin-cli-") as directory:
            if self._process is None or self._process.poll() is not None:
                self._process = subprocess.Popen(
                    [sys.executable, "-c", _ZYGOTE_MAIN, *sys.path],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    bufsize=0,
                )
            assert self._process.stdin
            out, err = Path(directory, "stdout"), Path(directory, "stderr")
            request = {"argv": argv, "env": env, "cwd": os.getcwd(), "out": str(out)}
            request["err"] = str(err)
            self._process.stdin.write(json.dumps(request).encode() + b"\n")
            pid = self._reply()
            assert pid is not None
            code = self._reply(time.monotonic() + timeout)
            if code is None:
                os.kill(pid, signal.SIGKILL)
                self._reply()
                raise subprocess.TimeoutExpired(
                    [sys.executable, "-m", "twin", *argv],
                    timeout,
                    output=out.read_text(),
                    stderr=err.read_text(),
                )
            return code, out.read_text(), err.read_text()


_zygote_of_this_worker = _Zygote()


def citytwin_process(
    args: tuple[str, ...] | list[str],
    env: dict[str, str],
    check: bool = False,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    """`python -m twin ARGS` with exactly `env`, as a separate process; like subprocess.run
    with capture_output=True and text=True."""
    command = [sys.executable, "-m", "twin", *args]
    if os.environ.get("CITYTWIN_TEST_CLI_SPAWN"):
        return subprocess.run(
            command, env=env, capture_output=True, text=True, check=check, timeout=timeout
        )
    code, out, err = _zygote_of_this_worker.run(list(args), dict(env), timeout)
    result = subprocess.CompletedProcess(command, code, out, err)
    if check:
        result.check_returncode()
    return result


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

    @functools.cached_property
    def trust(self) -> bytes:
        """The fleet CA's certificates, PEM; read once, as no test changes a running
        deployment's CA (importing one is tested on servers of their own)."""
        from tests.coap_devices import fleet_trust

        return fleet_trust(self.db)


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
    from tests.coap_devices import Site

    return Site(deployment.server, deployment.api("admin"), deployment.trust)


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
