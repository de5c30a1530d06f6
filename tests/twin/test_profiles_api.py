"""ProfileService through a real server: built-ins, and custom profiles validating twins."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import json_format

from citytwin.v1 import devices_pb2 as d
from citytwin.v1 import profiles_pb2 as p
from citytwin.v1 import twins_pb2 as t
from tests.conftest import Deployment, unique
from tests.twin.test_twins_api import struct


def test_builtin_profiles_are_listed(deployment: Deployment) -> None:
    api = deployment.api("viewer")
    listed = api.call(api.profiles.ListProfiles, p.ListProfilesRequest())
    builtin = {x.model: x for x in listed.profiles if x.builtin}
    assert set(builtin) >= {"lamp-led-dimmable", "env-sensor", "camera-ip"}
    lamp = api.call(api.profiles.GetProfile, p.GetProfileRequest(name="profiles/lamp-led-dimmable"))
    brightness = next(x for x in lamp.properties if x.path == "brightness")
    assert (brightness.type, brightness.minimum, brightness.maximum) == (p.INTEGER, 0, 100)
    assert brightness.writable and lamp.kind == d.LAMP
    assert lamp.heartbeat_interval_seconds == 300
    with pytest.raises(grpc.RpcError) as info:
        api.call(api.profiles.GetProfile, p.GetProfileRequest(name="profiles/nope"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_custom_profile_validates_twins(deployment: Deployment) -> None:
    api = deployment.api()
    model = unique("bollard")
    created = api.call(
        api.profiles.CreateProfile,
        p.CreateProfileRequest(
            profile=p.DeviceProfile(
                model=model,
                kind=d.SENSOR,
                description="a parking bollard",
                properties=[
                    p.PropertySpec(path="raised", type=p.BOOLEAN, writable=True),
                    p.PropertySpec(
                        path="mode", type=p.STRING, writable=True, allowed_values=["auto", "manual"]
                    ),
                    p.PropertySpec(path="cycles", type=p.INTEGER, minimum=0),
                ],
            )
        ),
    )
    assert created.name == f"profiles/{model}" and not created.builtin
    with pytest.raises(grpc.RpcError) as info:
        api.call(api.profiles.CreateProfile, p.CreateProfileRequest(profile=created))
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    device_id = unique("bollard")
    api.call(
        api.devices.CreateDevice,
        d.CreateDeviceRequest(
            device_id=device_id,
            device=d.Device(kind=d.SENSOR, model=model, serial_number=unique("sn")),
        ),
    )
    name = f"devices/{device_id}"
    twin = api.call(
        api.twins.UpdateDesired,
        t.UpdateDesiredRequest(name=name, patch=struct({"raised": True, "mode": "auto"})),
    )
    assert json_format.MessageToDict(twin.desired) == {"raised": True, "mode": "auto"}
    for patch, path in (({"mode": "chaos"}, "desired.mode"), ({"cycles": 3}, "desired.cycles")):
        with pytest.raises(grpc.RpcError) as info:
            api.call(
                api.twins.UpdateDesired, t.UpdateDesiredRequest(name=name, patch=struct(patch))
            )
        assert (
            info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and path in info.value.details()
        )


@pytest.mark.parametrize(
    "properties",
    [
        [],
        [p.PropertySpec(path="a.b", type=p.NUMBER)],
        [p.PropertySpec(path="a", type=p.STRING, minimum=1)],
        [p.PropertySpec(path="a", type=p.NUMBER), p.PropertySpec(path="a", type=p.NUMBER)],
        [p.PropertySpec(path="a")],
    ],
)
def test_inconsistent_profiles_are_refused(
    deployment: Deployment, properties: list[p.PropertySpec]
) -> None:
    api = deployment.api()
    model = unique("bad")
    with pytest.raises(grpc.RpcError) as info:
        api.call(
            api.profiles.CreateProfile,
            p.CreateProfileRequest(
                profile=p.DeviceProfile(model=model, kind=d.SENSOR, properties=properties)
            ),
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as info:
        api.call(api.profiles.GetProfile, p.GetProfileRequest(name=f"profiles/{model}"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
