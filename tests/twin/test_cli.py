"""The API commands of `citytwin` (devices, twin), run as a separate process against a real
server, plus the patch-building rules, which need no server."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Database, Deployment, Server, citytwin_process, run_cli, unique
from tests.twin.test_grpc_tls import service_issued_tls
from twin.cli.api_client import device_name
from twin.cli.twin_commands import build_patch
from twin.errors import InvalidArgument

MODEL = "lamp-led-dimmable"


def citytwin(
    dep: Deployment, *args: str, token: str | None = None, role: str = "admin"
) -> subprocess.CompletedProcess[str]:
    """Run `citytwin ARGS` against the deployment's server; `token=""` sends none at all."""
    env = {**os.environ, "CITYTWIN_ADDRESS": dep.server.address}
    env.pop("CITYTWIN_TOKEN", None)
    chosen = dep.tokens[role] if token is None else token
    if chosen:
        env["CITYTWIN_TOKEN"] = chosen
    return citytwin_process(args, env)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def json_of(result: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(ok(result))


def json_of_lines(result: subprocess.CompletedProcess[str]) -> list[Any]:
    return [json.loads(line) for line in ok(result).splitlines()]


def test_devices_and_twins_round_trip(deployment: Deployment) -> None:
    district = unique("cli")
    first, second = unique("cli-a"), unique("cli-b")
    created = json_of(
        citytwin(
            deployment,
            *("devices", "create", "--kind", "lamp", "--model", MODEL, "--serial", unique("sn")),
            *("--id", first, "--label", f"district={district}", "--label", "street=main"),
            *("--lat", "52.37", "--lon", "4.89", "--site", "pole-N-0042", "--json"),
        )
    )
    assert created["name"] == f"devices/{first}" and created["kind"] == "LAMP"
    assert created["labels"] == {"district": district, "street": "main"}
    assert created["location"]["site_id"] == "pole-N-0042"
    table = ok(
        citytwin(
            deployment,
            *("devices", "create", "--kind", "lamp", "--model", MODEL, "--serial", unique("sn")),
            *("--id", second, "--label", f"district={district}"),
        )
    )
    assert f"devices/{second}" in table and "registered" in table

    selector = f"district={district}"
    listing = ok(citytwin(deployment, "devices", "list", "--filter", selector))
    assert first in listing and second in listing and "pole-N-0042" in listing
    assert f"district={district},street=main" in listing
    page = citytwin(deployment, "devices", "list", "--filter", selector, "--page-size", "1")
    assert first in ok(page) and second not in page.stdout
    assert "--page-token" in page.stderr
    everything = citytwin(
        deployment, "devices", "list", "--filter", selector, "--page-size", "1", "--all", "--json"
    )
    assert [d["name"] for d in json_of(everything)] == [f"devices/{first}", f"devices/{second}"]
    assert "--page-token" not in everything.stderr

    shown = ok(citytwin(deployment, "devices", "get", f"devices/{first}"))
    assert MODEL in shown and "52.37" in shown and "street=main" in shown

    after_one = ok(
        citytwin(
            deployment,
            *("twin", "set-desired", first, "--patch", '{"brightness": 30}'),
            *("--set", "power=true", "--expected-version", "0"),
        )
    )
    assert '"brightness": 30' in after_one and '"power": true' in after_one
    twin = json_of(citytwin(deployment, "twin", "get", first, "--json"))
    assert twin["name"] == f"devices/{first}/twin"
    assert twin["version"] == "1"  # int64 is a string in the protobuf JSON mapping
    assert twin["desired"] == {"brightness": 30, "power": True}
    assert twin["delta"] == {"brightness": 30, "power": True}

    bulk = citytwin(
        deployment,
        *("twin", "set-desired", "--selector", f"kind=lamp,{selector}", "--set", "brightness=30"),
    )
    assert ok(bulk).strip() == "matched 2, changed 1"

    replay = json_of_lines(
        citytwin(
            deployment,
            *("twin", "watch", "--filter", selector, "--after", "0", "--limit", "6", "--json"),
        )
    )
    # Each first desired change also makes the (offline) twin's sync status "stale".
    assert [(e["device_name"], e["type"]) for e in replay] == [
        (f"devices/{first}", "DEVICE_CREATED"),
        (f"devices/{second}", "DEVICE_CREATED"),
        (f"devices/{first}", "DESIRED_UPDATED"),
        (f"devices/{first}", "SYNC_STATUS_CHANGED"),
        (f"devices/{second}", "DESIRED_UPDATED"),
        (f"devices/{second}", "SYNC_STATUS_CHANGED"),
    ]
    replay = [e for e in replay if e["type"] != "SYNC_STATUS_CHANGED"]
    resumed = ok(
        citytwin(
            deployment,
            *("twin", "watch", "--filter", selector, "--after", replay[1]["cursor"]),
            *("--limit", "3"),
        )
    ).splitlines()
    resumed = [line for line in resumed if "SYNC_STATUS_CHANGED" not in line]
    assert [line.split()[0] for line in resumed] == [replay[2]["cursor"], replay[3]["cursor"]]
    assert resumed[0].split()[2:] == [
        first,
        "DESIRED_UPDATED",
        "v1",
        '{"brightness":30,"power":true}',
    ]
    assert resumed[1].split()[2:] == [second, "DESIRED_UPDATED", "v1", '{"brightness":30}']


def test_failures_are_one_line_with_exit_code_2(deployment: Deployment) -> None:
    no_token = citytwin(deployment, "devices", "list", token="")
    assert no_token.returncode == 2 and "CITYTWIN_TOKEN" in no_token.stderr

    wrong = citytwin(deployment, "devices", "list", token="not-a-real-token")
    assert wrong.returncode == 2 and "citytwin: UNAUTHENTICATED: " in wrong.stderr
    assert "Traceback" not in wrong.stderr

    device = unique("cli-v")
    denied = citytwin(
        deployment, "twin", "set-desired", device, "--set", "brightness=10", role="viewer"
    )
    assert denied.returncode == 2 and "citytwin: PERMISSION_DENIED: " in denied.stderr

    bad = citytwin(deployment, "twin", "set-desired", device, "--patch", "[1, 2]")
    assert bad.returncode != 0 and "--patch must be a JSON object" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_tls_ca_verifies_the_server(fresh_db: Database, tmp_path: Path) -> None:
    cert, key, trust = service_issued_tls(fresh_db, tmp_path)
    token = run_cli(fresh_db, "token", "create", "--role", "viewer").stdout.strip()
    server = Server(
        fresh_db,
        extra_env={"CITYTWIN_TLS_CERT": str(cert), "CITYTWIN_TLS_KEY": str(key)},
        tls_root=trust.read_bytes(),
    ).start()
    try:
        connection = ["--address", server.address, "--token", token, "--tls-ca", str(trust)]
        listed = citytwin_process(["devices", "list", "--json", *connection], dict(os.environ))
        assert json_of(listed) == []
    finally:
        server.stop()


def test_build_patch_merges_sets_over_the_patch() -> None:
    patch = build_patch(
        '{"power": true, "schedule": {"on": "22:00"}}',
        ["brightness=40", "schedule.off=06:00", "mode.name=eco", "note=null", 'tags=["a"]'],
    )
    assert patch == {
        "power": True,
        "brightness": 40,
        "schedule": {"on": "22:00", "off": "06:00"},
        "mode": {"name": "eco"},
        "note": None,
        "tags": ["a"],
    }
    assert build_patch(None, ["a=1", "a.b=2"]) == {"a": {"b": 2}}


@pytest.mark.parametrize(
    ("patch", "sets", "message"),
    [
        ("[1]", [], "must be a JSON object"),
        ("{brightness: 1}", [], "not valid JSON"),
        (None, [], "nothing to change"),
        (None, ["brightness"], "PATH=VALUE"),
        (None, ["a..b=1"], "PATH=VALUE"),
    ],
)
def test_build_patch_refuses_what_is_not_a_patch(
    patch: str | None, sets: list[str], message: str
) -> None:
    with pytest.raises(InvalidArgument, match=message):
        build_patch(patch, sets)


def test_device_names() -> None:
    assert device_name("lamp-1") == device_name("devices/lamp-1/twin") == "devices/lamp-1"
    with pytest.raises(InvalidArgument):
        device_name("devices/a/b")
