"""DeviceService through a real server and real gRPC channels, on every backend."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask

from citytwin.v1 import devices_pb2 as d
from tests.conftest import Deployment, unique


def lamp(serial: str, **labels: str) -> d.Device:
    return d.Device(
        kind=d.LAMP,
        model="lamp-led-dimmable",
        serial_number=serial,
        labels=labels,
        location=d.Location(latitude=52.37, longitude=4.89, site_id="pole-N-0042"),
    )


def create(dep: Deployment, device_id: str, device: d.Device, role: str = "admin") -> d.Device:
    api = dep.api(role)
    return api.call(
        api.devices.CreateDevice, d.CreateDeviceRequest(device_id=device_id, device=device)
    )


def status_of(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()  # type: ignore[operator]
    return info.value.code()


def test_create_get_and_fields(deployment: Deployment) -> None:
    device_id = unique("lamp")
    created = create(deployment, device_id, lamp(unique("sn"), district="north"))
    assert created.name == f"devices/{device_id}"
    assert created.state == d.REGISTERED
    assert created.labels["district"] == "north"
    assert created.location.site_id == "pole-N-0042"
    assert created.create_time.seconds > 0 and not created.HasField("last_seen_time")
    api = deployment.api("viewer")
    got = api.call(api.devices.GetDevice, d.GetDeviceRequest(name=created.name))
    assert got == created


def test_generated_id_when_none_given(deployment: Deployment) -> None:
    created = create(deployment, "", lamp(unique("sn")))
    assert created.name.startswith("devices/d-")


@pytest.mark.parametrize(
    ("device_id", "device", "fragment"),
    [
        ("Bad_Id", lamp("sn-x1"), "device_id"),
        ("ok-1", d.Device(model="lamp-led-dimmable", serial_number="sn-x2"), "kind"),
        ("ok-2", d.Device(kind=d.LAMP, model="no-such-model", serial_number="s"), "no-such-model"),
        ("ok-3", d.Device(kind=d.CAMERA, model="lamp-led-dimmable", serial_number="s"), "lamp"),
        ("ok-4", lamp("sn-x3", **{"Bad Key": "v"}), "label key"),
        (
            "ok-5",
            d.Device(
                kind=d.LAMP,
                model="lamp-led-dimmable",
                serial_number="s",
                location=d.Location(latitude=91),
            ),
            "latitude",
        ),
    ],
)
def test_invalid_creates_are_refused_and_store_nothing(
    deployment: Deployment, device_id: str, device: d.Device, fragment: str
) -> None:
    api = deployment.api()
    with pytest.raises(grpc.RpcError) as info:
        api.call(
            api.devices.CreateDevice, d.CreateDeviceRequest(device_id=device_id, device=device)
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in info.value.details()
    if device_id != "Bad_Id":
        code = status_of(
            lambda: api.call(api.devices.GetDevice, d.GetDeviceRequest(name=f"devices/{device_id}"))
        )
        assert code == grpc.StatusCode.NOT_FOUND


def test_duplicate_id_and_serial(deployment: Deployment) -> None:
    device_id, serial = unique("lamp"), unique("sn")
    create(deployment, device_id, lamp(serial))
    api = deployment.api()
    for request in (
        d.CreateDeviceRequest(device_id=device_id, device=lamp(unique("sn"))),
        d.CreateDeviceRequest(device_id=unique("lamp"), device=lamp(serial)),
    ):
        code = status_of(lambda r=request: api.call(api.devices.CreateDevice, r))
        assert code == grpc.StatusCode.ALREADY_EXISTS


def test_unknown_device_and_bad_names(deployment: Deployment) -> None:
    api = deployment.api()
    get = api.devices.GetDevice
    assert status_of(lambda: api.call(get, d.GetDeviceRequest(name="devices/nope-404"))) == (
        grpc.StatusCode.NOT_FOUND
    )
    assert status_of(lambda: api.call(get, d.GetDeviceRequest(name="lamps/x"))) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )


def test_list_pages_with_selector(deployment: Deployment) -> None:
    district = unique("dist")
    ids = sorted(unique("pg") for _ in range(7))
    for i, device_id in enumerate(ids):
        create(deployment, device_id, lamp(unique("sn"), district=district, row=str(i % 2)))
    api = deployment.api()
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        reply = api.call(
            api.devices.ListDevices,
            d.ListDevicesRequest(filter=f"district={district}", page_size=3, page_token=token),
        )
        seen += [x.name.removeprefix("devices/") for x in reply.devices]
        pages += 1
        token = reply.next_page_token
        if not token:
            break
    assert seen == ids and pages == 3
    odd = api.call(
        api.devices.ListDevices, d.ListDevicesRequest(filter=f"district={district},row=1")
    )
    assert len(odd.devices) == 3
    assert (
        status_of(
            lambda: api.call(
                api.devices.ListDevices,
                d.ListDevicesRequest(
                    filter="kind=lamp", page_token=reply.next_page_token or "eyJ4Ijox"
                ),
            )
        )
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    assert (
        status_of(
            lambda: api.call(api.devices.ListDevices, d.ListDevicesRequest(filter="kind=bus"))
        )
        == grpc.StatusCode.INVALID_ARGUMENT
    )


def test_update_labels_and_location_with_mask(deployment: Deployment) -> None:
    device_id = unique("lamp")
    created = create(deployment, device_id, lamp(unique("sn"), district="north"))
    api = deployment.api("installer")
    changed = d.Device(
        name=created.name, labels={"district": "south"}, location=d.Location(site_id="pole-S-1")
    )
    updated = api.call(
        api.devices.UpdateDevice,
        d.UpdateDeviceRequest(device=changed, update_mask=FieldMask(paths=["labels"])),
    )
    assert updated.labels == {"district": "south"}
    assert updated.location.site_id == "pole-N-0042"  # not in the mask
    assert updated.update_time.ToDatetime() >= created.update_time.ToDatetime()
    for paths in ([], ["serial_number"]):
        code = status_of(
            lambda p=paths: api.call(
                api.devices.UpdateDevice,
                d.UpdateDeviceRequest(device=changed, update_mask=FieldMask(paths=p)),
            )
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_decommission_makes_twin_read_only(deployment: Deployment) -> None:
    from google.protobuf.struct_pb2 import Struct

    from citytwin.v1 import twins_pb2 as t

    device_id = unique("lamp")
    created = create(deployment, device_id, lamp(unique("sn")))
    api = deployment.api()
    gone = api.call(api.devices.DecommissionDevice, d.DecommissionDeviceRequest(name=created.name))
    assert gone.state == d.DECOMMISSIONED
    again = api.call(api.devices.DecommissionDevice, d.DecommissionDeviceRequest(name=created.name))
    assert again.state == d.DECOMMISSIONED
    patch = Struct()
    patch.update({"brightness": 10})
    code = status_of(
        lambda: api.call(
            api.twins.UpdateDesired, t.UpdateDesiredRequest(name=created.name, patch=patch)
        )
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    relabel = d.UpdateDeviceRequest(
        device=d.Device(name=created.name, labels={"district": "x"}),
        update_mask=FieldMask(paths=["labels"]),
    )
    code = status_of(lambda: api.call(api.devices.UpdateDevice, relabel))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
