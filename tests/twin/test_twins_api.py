"""TwinService through a real server: merge patches, delta, versions, profiles, bulk updates
and queries, on every backend."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from google.protobuf.struct_pb2 import Struct

from citytwin.v1 import devices_pb2 as d
from citytwin.v1 import twins_pb2 as t
from tests.conftest import Api, Deployment, unique


def struct(value: dict[str, Any]) -> Struct:
    result = Struct()
    result.update(value)
    return result


def plain(value: Struct) -> dict[str, Any]:
    return json_format.MessageToDict(value)


def new_device(
    dep: Deployment, kind: int = d.LAMP, model: str = "lamp-led-dimmable", **labels: str
) -> str:
    api = dep.api()
    device_id = unique("dev")
    api.call(
        api.devices.CreateDevice,
        d.CreateDeviceRequest(
            device_id=device_id,
            device=d.Device(kind=kind, model=model, serial_number=unique("sn"), labels=labels),
        ),
    )
    return f"devices/{device_id}"


def desired(api: Api, name: str, patch: dict[str, Any], version: int = 0) -> t.Twin:
    return api.call(
        api.twins.UpdateDesired,
        t.UpdateDesiredRequest(name=name, patch=struct(patch), expected_version=version),
    )


def reported(api: Api, name: str, patch: dict[str, Any]) -> t.Twin:
    return api.call(
        api.twins.UpdateReported, t.UpdateReportedRequest(name=name, patch=struct(patch))
    )


def error_of(call: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def test_new_twin_is_empty_at_version_zero(deployment: Deployment) -> None:
    name = new_device(deployment)
    api = deployment.api("viewer")
    twin = api.call(api.twins.GetTwin, t.GetTwinRequest(name=f"{name}/twin"))
    assert twin.name == f"{name}/twin" and twin.version == 0
    assert plain(twin.desired) == {} and plain(twin.reported) == {} and plain(twin.delta) == {}


def test_merge_patch_semantics_and_nested_delta(deployment: Deployment) -> None:
    name = new_device(deployment)
    api = deployment.api()
    schedule = [{"at": "22:00", "level": 60}, {"at": "01:00", "level": 30}]
    twin = desired(api, name, {"power": True, "brightness": 80, "dimming_schedule": schedule})
    assert twin.version == 1
    twin = reported(
        api,
        name,
        {
            "power": True,
            "brightness": 50,
            "dimming_schedule": schedule[:1],
            "energy": {"total_wh": 12.5, "power_w": 40},
            "faults": {"lamp_failure": False},
        },
    )
    assert twin.version == 2
    # Leaves that differ are in the delta; arrays compare whole.
    assert plain(twin.delta) == {"brightness": 80, "dimming_schedule": schedule}
    # null deletes; nested objects merge.
    twin = reported(api, name, {"energy": {"power_w": None}, "brightness": 80})
    assert plain(twin.reported)["energy"] == {"total_wh": 12.5}
    assert plain(twin.delta) == {"dimming_schedule": schedule}
    twin = desired(api, name, {"dimming_schedule": None})
    assert "dimming_schedule" not in plain(twin.desired) and plain(twin.delta) == {}
    # Metadata mirrors each document with a timestamp per leaf.
    meta = plain(twin.reported_metadata)
    assert set(meta) == {"power", "brightness", "dimming_schedule", "energy", "faults"}
    assert set(meta["energy"]) == {"total_wh"} and meta["energy"]["total_wh"].endswith("Z")
    assert "dimming_schedule" not in plain(twin.desired_metadata)
    assert twin.version == 4


def test_noop_patch_keeps_version(deployment: Deployment) -> None:
    name = new_device(deployment)
    api = deployment.api()
    first = desired(api, name, {"brightness": 40})
    again = desired(api, name, {"brightness": 40, "power": None})
    assert again.version == first.version == 1


def test_expected_version_conflict_is_aborted_and_changes_nothing(deployment: Deployment) -> None:
    name = new_device(deployment)
    api = deployment.api()
    desired(api, name, {"brightness": 10})
    ok = desired(api, name, {"brightness": 20}, version=1)
    assert ok.version == 2
    err = error_of(lambda: desired(api, name, {"brightness": 30}, version=1))
    assert err.code() == grpc.StatusCode.ABORTED and "version 2" in err.details()
    twin = api.call(api.twins.GetTwin, t.GetTwinRequest(name=name))
    assert plain(twin.desired) == {"brightness": 20} and twin.version == 2


@pytest.mark.parametrize(
    ("patch", "path"),
    [
        ({"brightness": 120}, "desired.brightness"),
        ({"brightness": "high"}, "desired.brightness"),
        ({"colour": "red"}, "desired.colour"),
        ({"energy": {"total_wh": 5}}, "desired.energy"),
        (
            {"dimming_schedule": [{"at": "22:00", "level": 101}]},
            "desired.dimming_schedule[0].level",
        ),
    ],
)
def test_profile_violations_name_the_path(
    deployment: Deployment, patch: dict[str, Any], path: str
) -> None:
    name = new_device(deployment)
    api = deployment.api()
    desired(api, name, {"brightness": 5})
    err = error_of(lambda: desired(api, name, patch))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert path in err.details()
    twin = api.call(api.twins.GetTwin, t.GetTwinRequest(name=name))
    assert plain(twin.desired) == {"brightness": 5} and twin.version == 1


def test_reported_may_set_read_only_but_not_unknown(deployment: Deployment) -> None:
    name = new_device(deployment, kind=d.SENSOR, model="env-sensor")
    api = deployment.api("service")
    twin = reported(api, name, {"pm2_5": 12.5, "battery": 80})
    assert plain(twin.reported) == {"pm2_5": 12.5, "battery": 80}
    err = error_of(lambda: reported(api, name, {"pm2_5": -1}))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "reported.pm2_5" in err.details()


def test_oversize_and_malformed_patches(deployment: Deployment) -> None:
    name = new_device(deployment)
    api = deployment.api()
    desired(api, name, {"brightness": 5})
    huge = {"dimming_schedule": [{"at": "x" * 30, "level": 1}] * 3000}
    err = error_of(lambda: desired(api, name, huge))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "limit" in err.details()
    deep: dict[str, Any] = {}
    node = deep
    for _ in range(20):
        node["a"] = {}
        node = node["a"]
    err = error_of(lambda: desired(api, name, deep))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    # Beyond the transport bound: gRPC itself refuses.
    monster = {"x": "y" * (2 * 1024 * 1024)}
    err = error_of(lambda: desired(api, name, monster))
    assert err.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT)
    err = error_of(lambda: desired(api, "devices/no-such-device", {"brightness": 1}))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    twin = api.call(api.twins.GetTwin, t.GetTwinRequest(name=name))
    assert twin.version == 1


def test_bulk_update_by_selector_on_1000_devices(deployment: Deployment) -> None:
    district = unique("north")
    api = deployment.api()
    # Created 16 at a time (each call waited for in the end): the bulk update is the subject.
    in_flight: list[grpc.Future] = []
    for i in range(1000):
        in_flight.append(
            api.devices.CreateDevice.future(
                d.CreateDeviceRequest(
                    device_id=f"{district}-{i:04d}",
                    device=d.Device(
                        kind=d.LAMP,
                        model="lamp-led-dimmable",
                        serial_number=f"{district}-sn-{i}",
                        labels={"district": district},
                    ),
                ),
                metadata=api.metadata,
                timeout=60,
            )
        )
        if len(in_flight) == 16:
            in_flight.pop(0).result()
    for call in in_flight:
        call.result()
    # 10 of them already have the value: matched but not changed.
    for i in range(10):
        desired(api, f"devices/{district}-{i:04d}", {"brightness": 40})
    reply = api.call(
        api.twins.BulkUpdateDesired,
        t.BulkUpdateDesiredRequest(
            filter=f"kind=lamp,district={district}", patch=struct({"brightness": 40})
        ),
        timeout=120,
    )
    assert (reply.matched_count, reply.changed_count) == (1000, 990)
    query = api.call(
        api.twins.QueryTwins,
        t.QueryTwinsRequest(filter=f"district={district},desired.brightness=40", page_size=1000),
    )
    assert len(query.twins) == 1000 and not query.next_page_token
    # A patch some matched model refuses changes nothing at all.
    err = error_of(
        lambda: api.call(
            api.twins.BulkUpdateDesired,
            t.BulkUpdateDesiredRequest(
                filter=f"district={district}", patch=struct({"brightness": 400})
            ),
        )
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "brightness" in err.details()
    err = error_of(
        lambda: api.call(
            api.twins.BulkUpdateDesired,
            t.BulkUpdateDesiredRequest(filter="", patch=struct({"power": True})),
        )
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    err = error_of(
        lambda: api.call(
            api.twins.BulkUpdateDesired,
            t.BulkUpdateDesiredRequest(filter="district=(", patch=struct({"power": True})),
        )
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    sample = api.call(api.twins.GetTwin, t.GetTwinRequest(name=f"devices/{district}-0500"))
    assert plain(sample.desired) == {"brightness": 40} and sample.version == 1


def test_query_by_reported_values_and_delta(deployment: Deployment) -> None:
    street = unique("street")
    api = deployment.api()
    names = [new_device(deployment, street=street) for _ in range(3)]
    desired(api, names[0], {"brightness": 70})
    reported(api, names[0], {"brightness": 30})
    desired(api, names[1], {"brightness": 70})
    reported(api, names[1], {"brightness": 70})
    reported(api, names[2], {"brightness": 90})

    def query(selector: str) -> list[str]:
        reply = api.call(
            api.twins.QueryTwins, t.QueryTwinsRequest(filter=f"street={street},{selector}")
        )
        return sorted(tw.name.removesuffix("/twin") for tw in reply.twins)

    assert query("has_delta=true") == [names[0]]
    assert query("has_delta=false") == sorted(names[1:])
    assert query("reported.brightness>=70") == sorted(names[1:])
    assert query("reported.brightness<50") == [names[0]]
    assert query("desired.brightness=70") == sorted(names[:2])
