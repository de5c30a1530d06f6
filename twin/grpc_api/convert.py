"""Translation between protobuf messages and the service's plain data."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from google.protobuf import json_format
from google.protobuf.struct_pb2 import Struct
from google.protobuf.timestamp_pb2 import Timestamp

from citytwin.v1 import devices_pb2, profiles_pb2, twins_pb2
from twin.change_feed import ChangeType
from twin.errors import InvalidArgument
from twin.merge_patch import Document, check_patch
from twin.models import ChangeEntry
from twin.profiles import DEFAULT_HEARTBEAT_SECONDS, Profile, PropertySpec, PropertyType
from twin.reconciliation import status_from_json
from twin.registry import DeviceView, LifecycleState, Location
from twin.telemetry_store import Sample
from twin.twin_store import TwinView

_KINDS = {
    devices_pb2.LAMP: "lamp",
    devices_pb2.SENSOR: "sensor",
    devices_pb2.CAMERA: "camera",
}
_KIND_ENUMS = {v: k for k, v in _KINDS.items()}
_STATES = {
    LifecycleState.REGISTERED.value: devices_pb2.REGISTERED,
    LifecycleState.PROVISIONED.value: devices_pb2.PROVISIONED,
    LifecycleState.ACTIVE.value: devices_pb2.ACTIVE,
    LifecycleState.DECOMMISSIONED.value: devices_pb2.DECOMMISSIONED,
}
_PROPERTY_TYPES = {
    PropertyType.BOOLEAN: profiles_pb2.BOOLEAN,
    PropertyType.INTEGER: profiles_pb2.INTEGER,
    PropertyType.NUMBER: profiles_pb2.NUMBER,
    PropertyType.STRING: profiles_pb2.STRING,
    PropertyType.OBJECT: profiles_pb2.OBJECT,
    PropertyType.ARRAY: profiles_pb2.ARRAY,
}
_PROPERTY_TYPE_NAMES = {v: k for k, v in _PROPERTY_TYPES.items()}


def device_id_from_name(name: str) -> str:
    """The device id in `devices/{id}` or `devices/{id}/twin`."""
    parts = name.split("/")
    if parts[0] == "devices" and len(parts) in (2, 3) and parts[1] and parts[2:] in ([], ["twin"]):
        return parts[1]
    raise InvalidArgument(f"name {name!r} is not of the form devices/{{device_id}}")


def model_from_profile_name(name: str) -> str:
    """The model in `profiles/{model}`."""
    prefix, _, model = name.partition("/")
    if prefix != "profiles" or not model:
        raise InvalidArgument(f"name {name!r} is not of the form profiles/{{model}}")
    return model


def timestamp(moment: datetime | None) -> Timestamp | None:
    """A protobuf Timestamp, or None for an unset time."""
    if moment is None:
        return None
    result = Timestamp()
    result.FromDatetime(moment)
    return result


def struct(document: Document | None) -> Struct:
    """A JSON object as a Struct."""
    result = Struct()
    if document:
        result.update(document)
    return result


def patch_from_struct(value: Struct) -> Document:
    """A validated, normalised merge patch from a request's Struct."""
    return check_patch(json_format.MessageToDict(value))


def kind_from_proto(kind: int) -> str:
    """The kind name of a DeviceKind value ("" if unspecified or unknown)."""
    return _KINDS.get(devices_pb2.DeviceKind.ValueType(kind), "")


def device_to_proto(view: DeviceView) -> devices_pb2.Device:
    """A DeviceView as a Device message."""
    return devices_pb2.Device(
        name=f"devices/{view.id}",
        kind=_KIND_ENUMS[view.kind],
        model=view.model,
        serial_number=view.serial_number,
        labels=dict(view.labels),
        location=location_to_proto(view.location),
        state=_STATES[view.state],
        create_time=timestamp(view.created_at),
        update_time=timestamp(view.updated_at),
        last_seen_time=timestamp(view.last_seen_at),
        online=view.online,
    )


def location_to_proto(location: Location) -> devices_pb2.Location:
    """A Location as a message (unset coordinates become 0)."""
    return devices_pb2.Location(
        latitude=location.latitude or 0.0,
        longitude=location.longitude or 0.0,
        site_id=location.site_id,
    )


def location_from_proto(message: devices_pb2.Location) -> Location:
    """A Location from a message."""
    return Location(message.latitude, message.longitude, message.site_id)


def device_from_proto(device_id: str, message: devices_pb2.Device) -> DeviceView:
    """The device a CreateDevice request describes."""
    return DeviceView(
        id=device_id,
        kind=kind_from_proto(message.kind),
        model=message.model,
        serial_number=message.serial_number,
        labels=dict(message.labels),
        # No location given is an unknown location, not the point 0/0 off the coast of Ghana.
        location=location_from_proto(message.location)
        if message.HasField("location")
        else Location(),
    )


def twin_to_proto(view: TwinView) -> twins_pb2.Twin:
    """A TwinView as a Twin message."""
    return twins_pb2.Twin(
        name=f"devices/{view.device_id}/twin",
        desired=struct(view.desired),
        reported=struct(view.reported),
        delta=struct(view.delta),
        desired_metadata=struct(view.desired_metadata),
        reported_metadata=struct(view.reported_metadata),
        version=view.version,
        update_time=timestamp(view.updated_at),
        sync_status=sync_status_to_proto(view.sync),
        acknowledgement=ack_to_proto(view.ack),
    )


_SYNC_STATES = {
    "in-sync": twins_pb2.SYNC_STATE_IN_SYNC,
    "pending": twins_pb2.SYNC_STATE_PENDING,
    "stale": twins_pb2.SYNC_STATE_STALE,
    "rejected": twins_pb2.SYNC_STATE_REJECTED,
}


def sync_status_to_proto(stored: dict[str, Any] | None) -> twins_pb2.SyncStatus:
    """A stored sync status as a message; a twin never given desired state is in sync."""
    if not stored:
        return twins_pb2.SyncStatus(state=twins_pb2.SYNC_STATE_IN_SYNC)
    status = status_from_json(stored)
    return twins_pb2.SyncStatus(
        state=_SYNC_STATES[status.state.value],
        desired_version=status.desired_version,
        push_time=timestamp(status.pushed_at),
        push_attempts=status.push_attempts,
        rejected_reason=status.rejected_reason,
        rejected_properties=dict(status.rejected_properties),
        converged_time=timestamp(status.converged_at),
        since_time=timestamp(status.since),
    )


def ack_to_proto(stored: dict[str, Any] | None) -> twins_pb2.Acknowledgement | None:
    """A stored acknowledgement as a message (None if the device never sent one)."""
    if not stored:
        return None
    return twins_pb2.Acknowledgement(
        version=stored["version"],
        status=stored["status"],
        reason=stored["reason"],
        properties={
            path: twins_pb2.PropertyAcknowledgement(status=p["status"], reason=p["reason"])
            for path, p in stored["properties"].items()
        },
    )


def change_to_proto(entry: ChangeEntry) -> twins_pb2.ChangeEvent:
    """A change-feed entry as a ChangeEvent."""
    event = twins_pb2.ChangeEvent(
        cursor=str(entry.id),
        device_name=f"devices/{entry.device_id}",
        type=twins_pb2.ChangeType.Value(ChangeType(entry.change_type).value),
        time=timestamp(entry.created_at),
        twin_version=entry.twin_version,
    )
    if entry.change_type == ChangeType.SYNC_STATUS_CHANGED:
        event.sync_status.CopyFrom(sync_status_to_proto(entry.patch))
    elif entry.patch is not None:
        event.patch.CopyFrom(struct(entry.patch))
    if entry.device is not None:
        event.device.CopyFrom(device_to_proto(DeviceView.from_json(entry.device)))
    return event


def profile_to_proto(profile: Profile) -> profiles_pb2.DeviceProfile:
    """A Profile as a DeviceProfile message."""
    return profiles_pb2.DeviceProfile(
        name=f"profiles/{profile.model}",
        model=profile.model,
        kind=_KIND_ENUMS[profile.kind],
        builtin=profile.builtin,
        description=profile.description,
        heartbeat_interval_seconds=profile.heartbeat_interval_seconds,
        properties=[
            profiles_pb2.PropertySpec(
                path=p.path,
                type=_PROPERTY_TYPES[p.type],
                writable=p.writable,
                minimum=p.minimum,
                maximum=p.maximum,
                allowed_values=list(p.allowed_values),
                unit=p.unit,
                description=p.description,
                max_length=p.max_length,
                max_items=p.max_items,
                alarm_severity=p.alarm_severity,
            )
            for p in profile.properties
        ],
    )


def profile_from_proto(message: profiles_pb2.DeviceProfile) -> Profile:
    """The custom Profile a CreateProfile request describes (checked by the store)."""
    properties = []
    for p in message.properties:
        if p.type not in _PROPERTY_TYPE_NAMES:
            raise InvalidArgument(f"property {p.path!r}: type is required")
        properties.append(
            PropertySpec(
                path=p.path,
                type=_PROPERTY_TYPE_NAMES[p.type],
                writable=p.writable,
                minimum=p.minimum if p.HasField("minimum") else None,
                maximum=p.maximum if p.HasField("maximum") else None,
                allowed_values=tuple(p.allowed_values),
                unit=p.unit,
                description=p.description,
                max_length=p.max_length or 256,
                max_items=p.max_items or 64,
                alarm_severity=p.alarm_severity,
            )
        )
    return Profile(
        model=message.model,
        kind=kind_from_proto(message.kind),
        properties=tuple(properties),
        description=message.description,
        heartbeat_interval_seconds=message.heartbeat_interval_seconds or DEFAULT_HEARTBEAT_SECONDS,
    )


def sample_to_proto(sample: Sample) -> twins_pb2.TelemetrySample:
    """A stored telemetry sample as a message."""
    message = twins_pb2.TelemetrySample(
        measurement=sample.name, time=timestamp(sample.at), unit=sample.unit
    )
    if isinstance(sample.value, bool):
        message.bool_value = sample.value
    elif isinstance(sample.value, str):
        message.string_value = sample.value
    elif sample.value is not None:
        message.number_value = sample.value
    return message
