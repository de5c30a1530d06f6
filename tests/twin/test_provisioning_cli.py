"""The provisioning commands of `citytwin` (install, enrollments, groups, certs, audit), run as
separate processes against a real server, plus the pure parts (install progress lines, names,
paging), which need no server. Certificates issued over CoAP are tested with enrollment."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import aiocoap
import grpc
import pytest
from google.protobuf import json_format
from google.protobuf.struct_pb2 import Struct

from citytwin.v1 import devices_pb2 as d
from citytwin.v1 import provisioning_pb2 as p
from citytwin.v1 import twins_pb2
from tests.coap_devices import PKCS10, coap_client, make_csr, new_key, request
from tests.conftest import Database, Deployment, Server, run_cli, unique
from tests.provisioning.test_provisioning_api import make_ca
from tests.twin.test_cli import citytwin, json_of, ok
from twin.cli.provisioning_commands import (
    ENROLLMENT_STATES,
    EXIT_INTERRUPTED,
    EXIT_NOT_ACTIVE,
    certificate_name,
    collect,
    enrollment_name,
    group_name,
    progress_lines,
)
from twin.errors import InvalidArgument

MODEL = "lamp-led-dimmable"
CODE_LINE = re.compile(r"^[0-9A-HJKMNP-TV-Z]{4}(-[0-9A-HJKMNP-TV-Z]{4}){3}$", re.MULTILINE)
# The half-block characters of a compact terminal QR code.
QR_BLOCKS = re.compile(r"[█▀▄]{7}")


def install(
    dep: Deployment, device: str, *args: str, role: str = "installer", token: str | None = None
) -> subprocess.CompletedProcess[str]:
    """`citytwin install` of a lamp with id `device` and a fresh serial number."""
    return citytwin(
        dep,
        *("install", "--kind", "lamp", "--model", MODEL, "--serial", unique("SN")),
        *("--id", device, *args),
        role=role,
        token=token,
    )


def columns(header: str) -> list[str]:
    """The column titles of a table's header line."""
    return [title.strip() for title in header.split("┃")]


def refused(result: subprocess.CompletedProcess[str], status: str) -> str:
    """The stderr of a command that failed with gRPC `status` (exit code 2)."""
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert f"citytwin: {status}: " in result.stderr
    assert "Traceback" not in result.stderr
    return result.stderr


def test_install_shows_the_code_and_its_qr_code(deployment: Deployment) -> None:
    device = unique("lamp")
    out = ok(
        install(
            deployment,
            device,
            *("--pole", "pole-N-0042", "--lat", "52.37", "--lon", "4.89"),
            *("--label", "district=north", "--code-ttl", "600"),
        )
    )
    codes = CODE_LINE.findall(out)
    assert len(codes) == 1, out
    assert QR_BLOCKS.search(out), out
    assert device in out and "enrollments/" in out
    registered = json_of(citytwin(deployment, "devices", "get", device, "--json"))
    assert registered["state"] == "REGISTERED"
    assert registered["labels"] == {"district": "north"}
    assert registered["location"]["site_id"] == "pole-N-0042"

    no_qr = ok(install(deployment, unique("lamp"), "--no-qr"))
    assert CODE_LINE.search(no_qr) and not QR_BLOCKS.search(no_qr)


def test_install_json_is_the_whole_response(deployment: Deployment) -> None:
    device = unique("lamp")
    result = json_of(install(deployment, device, "--json"))
    assert set(result) == {"device", "enrollment", "enrollment_code"}
    assert CODE_LINE.fullmatch(result["enrollment_code"])
    assert result["device"]["name"] == f"devices/{device}"
    assert result["device"]["state"] == "REGISTERED"
    assert result["enrollment"]["state"] == "PENDING"
    assert result["enrollment"]["device"] == f"devices/{device}"


def test_only_installers_and_admins_install(deployment: Deployment) -> None:
    assert install(deployment, unique("lamp"), "--json", role="admin").returncode == 0
    refused(install(deployment, unique("lamp"), role="viewer"), "PERMISSION_DENIED")
    bad = install(deployment, unique("lamp"), "--lat", "52.1")
    assert bad.returncode == 2 and "--lat and --lon go together" in bad.stderr


def test_enrollments_list_get_and_cancel(deployment: Deployment) -> None:
    device = unique("lamp")
    enrollment = json_of(install(deployment, device, "--json"))["enrollment"]
    name = enrollment["name"]
    number = name.removeprefix("enrollments/")

    listing = ok(citytwin(deployment, "enrollments", "list", "--device", device))
    assert name in listing and "pending" in listing
    by_number = json_of(citytwin(deployment, "enrollments", "get", number, "--json"))
    assert by_number == json_of(citytwin(deployment, "enrollments", "get", name, "--json"))
    assert by_number["state"] == "PENDING" and by_number["creator"].startswith("tokens/")

    cancelled = ok(citytwin(deployment, "enrollments", "cancel", number))
    assert "cancelled" in cancelled
    # Cancelling again changes nothing and is no error.
    assert ok(citytwin(deployment, "enrollments", "cancel", name)) == cancelled
    shown = ok(citytwin(deployment, "enrollments", "get", name))
    assert "cancelled" in shown and device in shown

    def names(*filters: str) -> list[str]:
        listed = citytwin(deployment, "enrollments", "list", "--device", device, *filters, "--json")
        return [e["name"] for e in json_of(listed)]

    assert names("--state", "cancelled") == [name]
    assert names("--state", "pending") == []
    assert names("--all") == [name]
    refused(citytwin(deployment, "enrollments", "get", "999999999"), "NOT_FOUND")
    not_a_number = citytwin(deployment, "enrollments", "get", "enrollments/x")
    assert not_a_number.returncode == 2 and "enrollment ids are numbers" in not_a_number.stderr


def test_enrollment_groups(deployment: Deployment, tmp_path: Path) -> None:
    group = unique("acme")
    ca = tmp_path / "acme-ca.pem"
    ca.write_text(make_ca(f"ACME factory CA {group}"))
    created = ok(
        citytwin(
            deployment,
            *("groups", "create", group, "--ca-cert", str(ca), "--description", "ACME lamps"),
            role="admin",
        )
    )
    assert f"CN=ACME factory CA {group}" in created and "ACME lamps" in created
    assert group in ok(citytwin(deployment, "groups", "list"))
    shown = json_of(citytwin(deployment, "groups", "get", f"enrollmentGroups/{group}", "--json"))
    assert shown["name"] == f"enrollmentGroups/{group}"
    assert shown["ca_certificate_pem"] == ca.read_text()
    assert len(shown["ca_fingerprint"]) == 64
    listed = json_of(citytwin(deployment, "groups", "list", "--json"))
    assert f"enrollmentGroups/{group}" in [g["name"] for g in listed]

    refused(citytwin(deployment, "groups", "delete", group, role="installer"), "PERMISSION_DENIED")
    assert ok(citytwin(deployment, "groups", "delete", group)).strip() == (
        f"deleted enrollmentGroups/{group}"
    )
    refused(citytwin(deployment, "groups", "get", group), "NOT_FOUND")

    leaf = tmp_path / "leaf.pem"
    leaf.write_text(make_ca("not a CA", is_ca=False))
    refused(
        citytwin(deployment, "groups", "create", unique("g"), "--ca-cert", str(leaf)),
        "INVALID_ARGUMENT",
    )
    missing = citytwin(deployment, "groups", "create", unique("g"), "--ca-cert", "/no/such.pem")
    assert missing.returncode == 2 and "cannot read --ca-cert" in missing.stderr


def test_certificates_of_a_device_without_any(deployment: Deployment) -> None:
    device = unique("lamp")
    ok(install(deployment, device, "--no-qr"))
    table = ok(citytwin(deployment, "certs", "list", "--device", device)).splitlines()
    # The header and its rule, no rows.
    assert len(table) == 2
    assert columns(table[0]) == [
        "serial",
        "device",
        "state",
        "authorization",
        "not after",
        "issued",
    ]
    assert json_of(citytwin(deployment, "certs", "list", "--device", device, "--json")) == []
    refused(citytwin(deployment, "certs", "show", "DE:AD:BE:EF"), "NOT_FOUND")
    refused(citytwin(deployment, "certs", "show", "deadbeef", "--pem"), "NOT_FOUND")


@pytest.fixture
def own_deployment(backend: str, fresh_db: Database) -> Iterator[Deployment]:
    """A server of the test's own, for tests that change the shared policy or read the
    whole audit log."""
    tokens = {
        role: run_cli(fresh_db, "token", "create", "--role", role).stdout.strip()
        for role in ("admin", "installer", "viewer")
    }
    server = Server(fresh_db).start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            yield Deployment(backend, fresh_db, server, tokens, channel)
    finally:
        server.stop()


def test_policy_and_audit_log(own_deployment: Deployment, tmp_path: Path) -> None:
    dep = own_deployment
    shown = ok(citytwin(dep, "certs", "policy", role="viewer"))
    assert "365" in shown and "86400" in shown and "never (defaults)" in shown
    changed = json_of(
        citytwin(
            dep, "certs", "policy", "--validity-days", "90", "--default-code-ttl", "3600", "--json"
        )
    )
    assert changed["certificate_validity_days"] == 90
    assert changed["default_code_ttl_seconds"] == "3600"  # int64: a string in JSON
    assert changed["renewal_window_days"] == 30  # not named, so unchanged
    assert changed["update_time"]
    assert "90" in ok(citytwin(dep, "certs", "policy"))
    error = refused(citytwin(dep, "certs", "policy", "--validity-days", "0"), "INVALID_ARGUMENT")
    assert "certificate_validity_days" in error
    refused(
        citytwin(dep, "certs", "policy", "--renewal-window-days", "1", role="viewer"),
        "PERMISSION_DENIED",
    )

    device = unique("lamp")
    name = json_of(install(dep, device, "--json"))["enrollment"]["name"]
    ok(citytwin(dep, "enrollments", "cancel", name))
    ca = tmp_path / "ca.pem"
    ca.write_text(make_ca("Audit CA"))
    group = unique("audit")
    ok(citytwin(dep, "groups", "create", group, "--ca-cert", str(ca)))

    events = json_of(citytwin(dep, "audit", "--json"))
    assert [(e["action"], e["success"]) for e in events] == [
        ("group.create", True),
        ("enrollment.cancel", True),
        ("enrollment.create", True),
        ("policy.update", True),
    ]
    assert events[3]["detail"] == "certificate_validity_days=90, default_code_ttl_seconds=3600"
    assert f"enrollmentGroups/{group}" in events[0]["detail"]
    table = ok(citytwin(dep, "audit")).splitlines()
    assert columns(table[0]) == [
        *("time", "action", "ok", "device", "serial", "actor", "source", "detail")
    ]
    assert "group.create" in table[2] and "policy.update" in table[-1]
    about_device = json_of(citytwin(dep, "audit", "--device", device, "--json"))
    assert [e["action"] for e in about_device] == ["enrollment.cancel", "enrollment.create"]
    assert all(e["device"] == f"devices/{device}" for e in about_device)
    newest = citytwin(dep, "audit", "--limit", "1", "--json")
    assert [e["action"] for e in json_of(newest)] == ["group.create"]
    assert "raise --limit" in newest.stderr
    # The log names devices outside any scope: scoped tokens may not read it.
    scoped = dep.token("installer", "district=north")
    refused(citytwin(dep, "audit", token=scoped), "PERMISSION_DENIED")


def test_install_wait_gives_up_after_the_timeout(deployment: Deployment) -> None:
    device = unique("lamp")
    started = time.monotonic()
    result = install(deployment, device, "--no-qr", "--wait", "--wait-timeout", "2")
    elapsed = time.monotonic() - started
    assert result.returncode == EXIT_NOT_ACTIVE, result.stderr
    assert re.search(r"^\S+ registered: waiting for the device", result.stdout, re.MULTILINE)
    assert f"devices/{device} did not become active within 2 s (still registered)" in (
        result.stderr
    )
    assert "its code works until" in result.stderr
    assert elapsed < 20


def _start_waiting(
    dep: Deployment, device: str, serial: str = "", seen: list[str] | None = None
) -> subprocess.Popen[str]:
    """`install --wait` in the background, once it has printed its first progress line
    (the lines up to it are appended to `seen`)."""
    env = {
        **os.environ,
        "CITYTWIN_ADDRESS": dep.server.address,
        "CITYTWIN_TOKEN": dep.tokens["installer"],
    }
    # A runner started in the background ignores SIGINT, and so would this child; the child
    # restores Python's handler itself (a preexec_fn would fork a process running gRPC).
    restore_sigint = (
        "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "sys.argv[0] = 'citytwin'; runpy.run_module('twin', run_name='__main__')"
    )
    process = subprocess.Popen(
        [
            *(sys.executable, "-c", restore_sigint, "install", "--kind", "lamp", "--model", MODEL),
            *("--serial", serial or unique("SN"), "--id", device),
            *("--no-qr", "--wait", "--wait-timeout", "60"),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    for line in process.stdout:
        if seen is not None:
            seen.append(line)
        if "registered: waiting" in line:
            return process
    process.wait(timeout=10)
    raise AssertionError(f"install --wait ended early: {process.stderr and process.stderr.read()}")


def test_install_wait_follows_the_device(deployment: Deployment) -> None:
    device = unique("lamp")
    process = _start_waiting(deployment, device)
    try:
        api = deployment.api("admin")
        api.call(
            api.devices.DecommissionDevice, d.DecommissionDeviceRequest(name=f"devices/{device}")
        )
        out, err = process.communicate(timeout=20)
    finally:
        process.kill()
    assert process.returncode == EXIT_NOT_ACTIVE, err
    assert re.search(r"^\S+ decommissioned: ", out, re.MULTILINE), out
    assert f"devices/{device} will not become active" in err


def test_install_wait_sees_enrollment_and_first_report(deployment: Deployment) -> None:
    device, serial, seen = unique("lamp"), unique("SN"), list[str]()
    process = _start_waiting(deployment, device, serial, seen)
    try:
        match = CODE_LINE.search("".join(seen))
        assert match, seen
        asyncio.run(_enroll_over_coaps(deployment, serial, match.group(0)))
        api = deployment.api("service")
        api.call(
            api.twins.UpdateReported,
            twins_pb2.UpdateReportedRequest(
                name=f"devices/{device}/twin",
                patch=json_format.ParseDict({"power": True}, Struct()),
            ),
        )
        out, err = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 0, err
    assert re.search(r"^\S+ provisioned: ", out, re.MULTILINE), out
    assert re.search(r"^\S+ active: ", out, re.MULTILINE), out


async def _enroll_over_coaps(dep: Deployment, serial: str, code: str) -> None:
    trust = run_cli(dep.db, "ca", "show", "--pem").stdout.encode()
    async with coap_client(trust) as tls:
        response = await request(
            tls,
            f"coaps+tcp://127.0.0.1:{dep.server.coaps_port}/.well-known/est/sen",
            aiocoap.POST,
            make_csr(new_key(), serial, code),
            content_format=PKCS10,
        )
    assert response.code == aiocoap.CHANGED, response.payload


def test_install_wait_stops_on_ctrl_c(deployment: Deployment) -> None:
    process = _start_waiting(deployment, unique("lamp"))
    try:
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=20)
    finally:
        process.kill()
    assert process.returncode == EXIT_INTERRUPTED, err
    assert "stopped waiting" in err and "Traceback" not in err


# --- no server -----------------------------------------------------------------------------

NOW = datetime(2025, 6, 1, 10, 30, 5, tzinfo=UTC)


def lamp_in(state: d.LifecycleState.ValueType) -> d.Device:
    return d.Device(name="devices/lamp-1", state=state)


def test_progress_lines_announce_each_step_once() -> None:
    assert progress_lines(None, lamp_in(d.REGISTERED), NOW) == [
        "2025-06-01T10:30:05+00:00 registered: waiting for the device to enroll with its code"
    ]
    assert progress_lines(d.REGISTERED, lamp_in(d.REGISTERED), NOW) == []
    assert progress_lines(d.REGISTERED, lamp_in(d.PROVISIONED), NOW) == [
        "2025-06-01T10:30:05+00:00 provisioned: certificate issued, waiting for the first report"
    ]
    assert progress_lines(d.PROVISIONED, lamp_in(d.ACTIVE), NOW) == [
        "2025-06-01T10:30:05+00:00 active: first report received"
    ]


def test_progress_lines_fill_in_a_step_passed_between_polls() -> None:
    lines = progress_lines(d.REGISTERED, lamp_in(d.ACTIVE), NOW)
    assert [line.split()[1] for line in lines] == ["provisioned:", "active:"]
    # Seen for the first time when already active: only what was seen.
    assert [line.split()[1] for line in progress_lines(None, lamp_in(d.ACTIVE), NOW)] == ["active:"]


def test_progress_lines_of_setbacks() -> None:
    # Going back (enrolling anew) or leaving the path announces just where the device is now.
    again = progress_lines(d.ACTIVE, lamp_in(d.REGISTERED), NOW)
    assert [line.split()[1] for line in again] == ["registered:"]
    gone = progress_lines(d.PROVISIONED, lamp_in(d.DECOMMISSIONED), NOW)
    assert [line.split()[1] for line in gone] == ["decommissioned:"]


def test_resource_names() -> None:
    assert enrollment_name("12") == enrollment_name(" enrollments/12 ") == "enrollments/12"
    assert group_name("acme") == group_name("enrollmentGroups/acme") == "enrollmentGroups/acme"
    assert certificate_name("0A:1B:FF") == certificate_name("certificates/0a1bff")
    assert certificate_name("0A:1B:FF") == "certificates/0a1bff"
    for bad in ("", "enrollments/", "x", "enrollments/1/2", "devices/1"):
        with pytest.raises(InvalidArgument):
            enrollment_name(bad)
    with pytest.raises(InvalidArgument):
        group_name("enrollmentGroups/a/b")


def test_collect_fetches_the_pages_asked_for() -> None:
    pages = {"": ([1, 2], "b"), "b": ([3, 4], "c"), "c": ([5], "")}
    asked: list[tuple[int, str]] = []

    def fetch(size: int, token: str) -> tuple[list[int], str]:
        asked.append((size, token))
        return pages[token]

    assert collect(fetch) == ([1, 2], "b")
    assert collect(fetch, every=True) == ([1, 2, 3, 4, 5], "")
    asked.clear()
    assert collect(fetch, limit=3) == ([1, 2, 3], "c")
    assert asked == [(3, ""), (1, "b")]


def test_enrollment_states_match_the_api() -> None:
    assert {p.EnrollmentState.Name(v).lower() for v in ENROLLMENT_STATES.values()} == set(
        ENROLLMENT_STATES
    )
