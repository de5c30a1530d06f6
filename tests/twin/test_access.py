"""Access control through a real server: tokens, roles and scopes."""

from __future__ import annotations

import json
import time
from typing import Any

import grpc
import pytest

from citytwin.v1 import devices_pb2 as d
from citytwin.v1 import profiles_pb2 as p
from citytwin.v1 import twins_pb2 as t
from tests.conftest import ROLES, Api, Deployment, run_cli, unique
from tests.twin.test_twins_api import struct


def code_of(call: Any) -> grpc.StatusCode | None:
    try:
        call()
    except grpc.RpcError as error:
        return error.code()
    return None


@pytest.fixture(scope="module")
def target(deployment: Deployment) -> str:
    api = deployment.api()
    device_id = unique("acl")
    api.call(
        api.devices.CreateDevice,
        d.CreateDeviceRequest(
            device_id=device_id,
            device=d.Device(
                kind=d.LAMP,
                model="lamp-led-dimmable",
                serial_number=unique("sn"),
                labels={"district": "acl"},
            ),
        ),
    )
    return f"devices/{device_id}"


def _calls(api: Api, name: str) -> dict[str, Any]:
    patch = struct({"brightness": 12})
    return {
        "get_device": lambda: api.call(api.devices.GetDevice, d.GetDeviceRequest(name=name)),
        "list_devices": lambda: api.call(api.devices.ListDevices, d.ListDevicesRequest()),
        "create_device": lambda: api.call(
            api.devices.CreateDevice,
            d.CreateDeviceRequest(
                device=d.Device(
                    kind=d.LAMP,
                    model="lamp-led-dimmable",
                    serial_number=unique("sn"),
                    labels={"district": "acl"},
                )
            ),
        ),
        "update_device": lambda: api.call(
            api.devices.UpdateDevice,
            d.UpdateDeviceRequest(
                device=d.Device(name=name, labels={"district": "acl"}),
                update_mask={"paths": ["labels"]},
            ),
        ),
        "get_twin": lambda: api.call(api.twins.GetTwin, t.GetTwinRequest(name=name)),
        "query_twins": lambda: api.call(
            api.twins.QueryTwins, t.QueryTwinsRequest(filter="district=acl")
        ),
        "set_desired": lambda: api.call(
            api.twins.UpdateDesired, t.UpdateDesiredRequest(name=name, patch=patch)
        ),
        "set_reported": lambda: api.call(
            api.twins.UpdateReported, t.UpdateReportedRequest(name=name, patch=patch)
        ),
        "bulk_desired": lambda: api.call(
            api.twins.BulkUpdateDesired,
            t.BulkUpdateDesiredRequest(filter="district=acl", patch=patch),
        ),
        "list_profiles": lambda: api.call(api.profiles.ListProfiles, p.ListProfilesRequest()),
        "create_profile": lambda: api.call(
            api.profiles.CreateProfile,
            p.CreateProfileRequest(
                profile=p.DeviceProfile(
                    model=unique("m"),
                    kind=d.SENSOR,
                    properties=[p.PropertySpec(path="level", type=p.NUMBER, minimum=0, maximum=1)],
                )
            ),
        ),
    }


READS = {"get_device", "list_devices", "get_twin", "query_twins", "list_profiles"}
ALLOWED = {
    "admin": READS
    | {
        "create_device",
        "update_device",
        "set_desired",
        "set_reported",
        "bulk_desired",
        "create_profile",
    },
    "service": READS | {"set_desired", "set_reported", "bulk_desired"},
    "installer": READS | {"create_device", "update_device"},
    "release-engineer": READS,
    "viewer": READS,
}


@pytest.mark.parametrize("role", ROLES)
def test_each_role_allowed_and_denied(deployment: Deployment, target: str, role: str) -> None:
    calls = _calls(deployment.api(role), target)
    for action, call in calls.items():
        expected = None if action in ALLOWED[role] else grpc.StatusCode.PERMISSION_DENIED
        assert code_of(call) == expected, f"{role} {action}"


@pytest.mark.parametrize(
    "metadata",
    [
        [],
        [("authorization", "Bearer ctk_wrong")],
        [("authorization", "Basic abc")],
        [("authorization", "Bearer not-even-a-token")],
    ],
)
def test_missing_or_wrong_token_is_unauthenticated(
    deployment: Deployment, target: str, metadata: list[tuple[str, str]]
) -> None:
    api = deployment.api()
    code = code_of(
        lambda: api.devices.GetDevice(d.GetDeviceRequest(name=target), metadata=metadata)
    )
    assert code == grpc.StatusCode.UNAUTHENTICATED


def test_revoked_token_stops_working(deployment: Deployment, target: str) -> None:
    token = deployment.token("viewer")
    api = deployment.api(token=token)
    assert code_of(lambda: api.call(api.devices.GetDevice, d.GetDeviceRequest(name=target))) is None
    # The server caches a token for at most 5 s from that first use on.
    cache_gone = time.monotonic() + 5.5
    listing = run_cli(deployment.db, "token", "list", "--json").stdout
    token_id = max(row["id"] for row in json.loads(listing))
    run_cli(deployment.db, "token", "revoke", str(token_id))
    while True:
        asked = time.monotonic()
        code = code_of(lambda: api.call(api.devices.GetDevice, d.GetDeviceRequest(name=target)))
        if code is not None:
            break
        # Still accepted: only ever from the cache, never once it must have expired.
        assert asked < cache_gone, "a revoked token still works after the 5 s cache"
        time.sleep(0.1)
    assert code == grpc.StatusCode.UNAUTHENTICATED


def test_scoped_installer_sees_only_their_district(deployment: Deployment) -> None:
    north, south = unique("north"), unique("south")
    admin = deployment.api()
    for district in (north, south):
        admin.call(
            admin.devices.CreateDevice,
            d.CreateDeviceRequest(
                device_id=district,
                device=d.Device(
                    kind=d.LAMP,
                    model="lamp-led-dimmable",
                    serial_number=unique("sn"),
                    labels={"district": district, "batch": "scoped"},
                ),
            ),
        )
    installer = deployment.api(token=deployment.token("installer", f"district={north}"))
    listed = installer.call(
        installer.devices.ListDevices, d.ListDevicesRequest(filter="batch=scoped")
    )
    assert [x.name for x in listed.devices] == [f"devices/{north}"]
    assert (
        code_of(
            lambda: installer.call(
                installer.devices.GetDevice, d.GetDeviceRequest(name=f"devices/{south}")
            )
        )
        == grpc.StatusCode.PERMISSION_DENIED
    )
    # Cannot create outside the scope, nor move a device out of it.
    assert (
        code_of(
            lambda: installer.call(
                installer.devices.CreateDevice,
                d.CreateDeviceRequest(
                    device=d.Device(
                        kind=d.LAMP,
                        model="lamp-led-dimmable",
                        serial_number=unique("sn"),
                        labels={"district": south},
                    )
                ),
            )
        )
        == grpc.StatusCode.PERMISSION_DENIED
    )
    assert (
        code_of(
            lambda: installer.call(
                installer.devices.UpdateDevice,
                d.UpdateDeviceRequest(
                    device=d.Device(name=f"devices/{north}", labels={"district": south}),
                    update_mask={"paths": ["labels"]},
                ),
            )
        )
        == grpc.StatusCode.PERMISSION_DENIED
    )
    got = installer.call(installer.devices.GetDevice, d.GetDeviceRequest(name=f"devices/{north}"))
    assert got.labels["district"] == north
    # A scoped service's bulk update only reaches its scope.
    service = deployment.api(token=deployment.token("service", f"district={north}"))
    reply = service.call(
        service.twins.BulkUpdateDesired,
        t.BulkUpdateDesiredRequest(filter="batch=scoped", patch=struct({"brightness": 1})),
    )
    assert reply.matched_count == 1


def test_token_create_refuses_bad_role_and_scope(deployment: Deployment) -> None:
    bad_role = run_cli(deployment.db, "token", "create", "--role", "root", check=False)
    assert bad_role.returncode != 0 and "unknown role" in bad_role.stderr
    bad_scope = run_cli(
        deployment.db, "token", "create", "--role", "viewer", "--scope", "reported.x=1", check=False
    )
    assert bad_scope.returncode != 0 and "scope" in bad_scope.stderr


def test_health_and_reflection_are_open(deployment: Deployment) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    health = health_pb2_grpc.HealthStub(deployment.channel)
    reply = health.Check(
        health_pb2.HealthCheckRequest(service="citytwin.v1.TwinService"), timeout=5
    )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(deployment.channel)
    responses = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
    )
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"citytwin.v1.DeviceService", "citytwin.v1.TwinService"} <= names
