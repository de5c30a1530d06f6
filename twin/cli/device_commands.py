"""`citytwin devices ...`: the device registry through the API."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from citytwin.v1 import devices_pb2 as d
from twin.cli.api_client import ApiClient, add_api_command, api_command, device_name
from twin.cli.output import (
    format_time,
    message_to_dict,
    print_json,
    print_key_values,
    print_table,
)
from twin.errors import InvalidArgument

KINDS = {"lamp": d.LAMP, "sensor": d.SENSOR, "camera": d.CAMERA}
LIST_COLUMNS = ["id", "kind", "model", "serial", "state", "labels", "site", "last seen"]


def device_id(device: d.Device) -> str:
    """The id part of a device's resource name."""
    return device.name.removeprefix("devices/")


def format_labels(labels: Any) -> str:
    """Labels as `k=v,k=v`, sorted by key."""
    return ",".join(f"{key}={labels[key]}" for key in sorted(labels))


def _kind(device: d.Device) -> str:
    return d.DeviceKind.Name(device.kind).lower()


def _state(device: d.Device) -> str:
    return d.LifecycleState.Name(device.state).lower()


def _last_seen(device: d.Device) -> str:
    return format_time(device.last_seen_time if device.HasField("last_seen_time") else None)


def device_row(device: d.Device) -> dict[str, str]:
    """One line of the device list."""
    return {
        "id": device_id(device),
        "kind": _kind(device),
        "model": device.model,
        "serial": device.serial_number,
        "state": _state(device),
        "labels": format_labels(device.labels),
        "site": device.location.site_id,
        "last seen": _last_seen(device),
    }


def print_device(device: d.Device, as_json: bool) -> None:
    """Show one device: every field as a key/value table, or the message as JSON."""
    if as_json:
        print_json(message_to_dict(device))
        return
    location = device.location if device.HasField("location") else None
    print_key_values(
        [
            ("name", device.name),
            ("kind", _kind(device)),
            ("model", device.model),
            ("serial", device.serial_number),
            ("state", _state(device)),
            ("labels", format_labels(device.labels)),
            ("latitude", str(location.latitude) if location else ""),
            ("longitude", str(location.longitude) if location else ""),
            ("site", location.site_id if location else ""),
            ("created", format_time(device.create_time)),
            ("updated", format_time(device.update_time)),
            ("last seen", _last_seen(device)),
        ]
    )


def parse_labels(items: list[str]) -> dict[str, str]:
    """`["k=v", ...]` as a dict; a later key wins."""
    labels: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidArgument(f"--label wants KEY=VALUE, got {item!r}")
        labels[key] = value
    return labels


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """The options describing a device to register (as `devices create` takes them)."""
    parser.add_argument("--serial", required=True, help="the manufacturer's serial number")
    parser.add_argument("--kind", required=True, choices=sorted(KINDS))
    parser.add_argument("--model", required=True, help="a device profile's model")
    parser.add_argument("--id", default="", help="device id (default: chosen by the service)")
    parser.add_argument(
        "--site", "--pole", dest="site", default="", metavar="POLE", help="pole or site id"
    )
    parser.add_argument("--lat", type=float, help="latitude in degrees (with --lon)")
    parser.add_argument("--lon", type=float, help="longitude in degrees (with --lat)")
    parser.add_argument(
        "--label", action="append", default=[], metavar="KEY=VALUE", help="repeatable"
    )


def device_from_args(args: argparse.Namespace) -> d.Device:
    """The device described by the options of `add_device_arguments`."""
    if (args.lat is None) != (args.lon is None):
        raise InvalidArgument("--lat and --lon go together")
    device = d.Device(
        kind=KINDS[args.kind],
        model=args.model,
        serial_number=args.serial,
        labels=parse_labels(args.label),
    )
    if args.lat is not None or args.site:
        device.location.CopyFrom(
            d.Location(latitude=args.lat or 0.0, longitude=args.lon or 0.0, site_id=args.site)
        )
    return device


@api_command
def _list(args: argparse.Namespace, api: ApiClient) -> int:
    devices: list[d.Device] = []
    token = args.page_token
    while True:
        request = d.ListDevicesRequest(
            filter=args.filter, page_size=args.page_size, page_token=token
        )
        response = api.call(api.devices.ListDevices, request)
        devices.extend(response.devices)
        token = response.next_page_token
        if not token or not args.all:
            break
    if args.json:
        print_json([message_to_dict(device) for device in devices])
    else:
        print_table([device_row(device) for device in devices], LIST_COLUMNS)
    if token:
        print(f"citytwin: more devices: --page-token {token} (or --all)", file=sys.stderr)
    return 0


@api_command
def _get(args: argparse.Namespace, api: ApiClient) -> int:
    device = api.call(api.devices.GetDevice, d.GetDeviceRequest(name=device_name(args.id)))
    print_device(device, args.json)
    return 0


@api_command
def _create(args: argparse.Namespace, api: ApiClient) -> int:
    device = device_from_args(args)
    created = api.call(
        api.devices.CreateDevice, d.CreateDeviceRequest(device_id=args.id, device=device)
    )
    print_device(created, args.json)
    return 0


def register(commands: Any) -> None:
    """Add `devices list|get|create`."""
    devices = commands.add_parser("devices", help="the device registry")
    sub = devices.add_subparsers(dest="devices_command", required=True, metavar="ACTION")

    listing = add_api_command(sub, "list", "list devices, optionally matching a selector")
    listing.add_argument("--filter", default="", metavar="SELECTOR", help="e.g. kind=lamp")
    listing.add_argument("--page-size", type=int, default=0, metavar="N", help="devices a page")
    listing.add_argument("--page-token", default="", metavar="TOKEN", help="continue a listing")
    listing.add_argument("--all", action="store_true", help="fetch every page")
    listing.set_defaults(func=_list)

    get = add_api_command(sub, "get", "show one device")
    get.add_argument("id", metavar="ID", help="device id or devices/ID")
    get.set_defaults(func=_get)

    create = add_api_command(sub, "create", "register a device")
    add_device_arguments(create)
    create.set_defaults(func=_create)
