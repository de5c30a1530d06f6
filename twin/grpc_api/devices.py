"""gRPC DeviceService: decode, call the registry, encode."""

from __future__ import annotations

from typing import Any

from citytwin.v1 import devices_pb2, devices_pb2_grpc
from twin import registry
from twin.change_feed import FeedNotifier
from twin.errors import InvalidArgument
from twin.grpc_api.convert import (
    device_from_proto,
    device_id_from_name,
    device_to_proto,
    location_from_proto,
)
from twin.grpc_api.interceptor import current_principal
from twin.selectors import parse_selector

_UPDATABLE = {"labels", "location"}


class DeviceServicer(devices_pb2_grpc.DeviceServiceServicer):
    """The device registry over gRPC."""

    def __init__(self, notifier: FeedNotifier) -> None:
        self._notifier = notifier

    async def CreateDevice(
        self, request: devices_pb2.CreateDeviceRequest, context: Any
    ) -> devices_pb2.Device:
        view = device_from_proto(request.device_id, request.device)
        created = await registry.create_device(view, current_principal(), self._notifier)
        return device_to_proto(created)

    async def GetDevice(
        self, request: devices_pb2.GetDeviceRequest, context: Any
    ) -> devices_pb2.Device:
        device_id = device_id_from_name(request.name)
        return device_to_proto(await registry.get_device(device_id, current_principal()))

    async def ListDevices(
        self, request: devices_pb2.ListDevicesRequest, context: Any
    ) -> devices_pb2.ListDevicesResponse:
        page, token = await registry.list_devices(
            parse_selector(request.filter),
            request.filter,
            request.page_size,
            request.page_token,
            current_principal(),
        )
        return devices_pb2.ListDevicesResponse(
            devices=[device_to_proto(d) for d in page], next_page_token=token
        )

    async def UpdateDevice(
        self, request: devices_pb2.UpdateDeviceRequest, context: Any
    ) -> devices_pb2.Device:
        paths = set(request.update_mask.paths)
        if not paths:
            raise InvalidArgument("update_mask is required (labels, location)")
        if paths - _UPDATABLE:
            raise InvalidArgument(
                f"update_mask may only name labels and location, not {sorted(paths - _UPDATABLE)}"
            )
        updated = await registry.update_device(
            device_id_from_name(request.device.name),
            labels=dict(request.device.labels) if "labels" in paths else None,
            location=location_from_proto(request.device.location) if "location" in paths else None,
            principal=current_principal(),
            notifier=self._notifier,
        )
        return device_to_proto(updated)

    async def DecommissionDevice(
        self, request: devices_pb2.DecommissionDeviceRequest, context: Any
    ) -> devices_pb2.Device:
        device_id = device_id_from_name(request.name)
        view = await registry.decommission_device(device_id, current_principal(), self._notifier)
        return device_to_proto(view)
