"""`citytwin twin ...`: read and write device twins, follow the change feed."""

from __future__ import annotations

import argparse
import json
from typing import Any

from google.protobuf import json_format
from google.protobuf.struct_pb2 import Struct

from citytwin.v1 import devices_pb2 as d
from citytwin.v1 import twins_pb2 as t
from twin.cli.api_client import ApiClient, add_api_command, api_command, device_name, follow
from twin.cli.argument_types import positive_int
from twin.cli.device_commands import format_labels
from twin.cli.output import (
    compact_json,
    format_time,
    message_to_dict,
    pretty_json,
    print_json,
    print_key_values,
)
from twin.errors import InvalidArgument


def parse_patch(text: str) -> dict[str, Any]:
    """The JSON object of `--patch`; anything else is refused with a clear message."""
    try:
        value = json.loads(text)
    except ValueError as error:
        raise InvalidArgument(f"--patch is not valid JSON: {error}") from error
    if not isinstance(value, dict):
        raise InvalidArgument(f"--patch must be a JSON object, not {type(value).__name__}")
    return value


def parse_assignment(text: str) -> tuple[list[str], Any]:
    """`a.b=VALUE` as (["a", "b"], VALUE): VALUE is JSON if it parses, else the string."""
    path, sep, raw = text.partition("=")
    keys = path.split(".")
    if not sep or not all(keys):
        raise InvalidArgument(f"--set wants PATH=VALUE with a dotted PATH, got {text!r}")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return keys, value


def build_patch(patch_text: str | None, assignments: list[str]) -> dict[str, Any]:
    """The merge patch of `--patch` with each `--set` applied over it, in order."""
    if patch_text is None and not assignments:
        raise InvalidArgument("nothing to change: give --patch JSON and/or --set PATH=VALUE")
    patch = parse_patch(patch_text) if patch_text is not None else {}
    for assignment in assignments:
        keys, value = parse_assignment(assignment)
        node = patch
        for key in keys[:-1]:
            child = node.get(key)
            if not isinstance(child, dict):
                child = node[key] = {}
            node = child
        node[keys[-1]] = value
    return patch


def _struct(value: dict[str, Any]) -> Struct:
    result = Struct()
    result.update(value)
    return result


def _plain(value: Struct) -> dict[str, Any]:
    return json_format.MessageToDict(value)


def print_twin(twin: t.Twin, as_json: bool) -> None:
    """Show a twin: version and documents as a table, or the whole message as JSON."""
    if as_json:
        print_json(message_to_dict(twin))
        return
    print_key_values(
        [
            ("name", twin.name),
            ("version", str(twin.version)),
            ("updated", format_time(twin.update_time if twin.HasField("update_time") else None)),
            ("desired", pretty_json(_plain(twin.desired))),
            ("reported", pretty_json(_plain(twin.reported))),
            ("delta", pretty_json(_plain(twin.delta))),
        ]
    )


def event_line(event: t.ChangeEvent) -> str:
    """One change-feed event on one line: cursor, time, device, type, then what changed."""
    if event.HasField("device"):
        state = d.LifecycleState.Name(event.device.state).lower()
        detail = f"state={state} labels={format_labels(event.device.labels)}"
    else:
        detail = f"v{event.twin_version} {compact_json(_plain(event.patch))}"
    return " ".join(
        [
            event.cursor,
            format_time(event.time),
            event.device_name.removeprefix("devices/"),
            t.ChangeType.Name(event.type),
            detail,
        ]
    )


@api_command
def _get(args: argparse.Namespace, api: ApiClient) -> int:
    twin = api.call(api.twins.GetTwin, t.GetTwinRequest(name=device_name(args.id)))
    print_twin(twin, args.json)
    return 0


@api_command
def _set_desired(args: argparse.Namespace, api: ApiClient) -> int:
    if (args.id is None) == (args.selector is None):
        raise InvalidArgument("give exactly one of a device ID or --selector")
    if args.selector is not None and args.expected_version:
        raise InvalidArgument("--expected-version applies to one device, not to --selector")
    patch = _struct(build_patch(args.patch, args.set))
    if args.selector is not None:
        response = api.call(
            api.twins.BulkUpdateDesired,
            t.BulkUpdateDesiredRequest(filter=args.selector, patch=patch),
        )
        if args.json:
            print_json(message_to_dict(response))
        else:
            print(f"matched {response.matched_count}, changed {response.changed_count}")
        return 0
    request = t.UpdateDesiredRequest(
        name=device_name(args.id), patch=patch, expected_version=args.expected_version
    )
    print_twin(api.call(api.twins.UpdateDesired, request), args.json)
    return 0


@api_command
def _watch(args: argparse.Namespace, api: ApiClient) -> int:
    request = t.WatchTwinsRequest(filter=args.filter, after_cursor=args.after)

    def show(event: t.ChangeEvent) -> None:
        if args.json:
            print_json(message_to_dict(event), compact=True)
        else:
            print(event_line(event), flush=True)

    return follow(api.stream(api.twins.WatchTwins, request), show, args.limit)


def register(commands: Any) -> None:
    """Add `twin get|set-desired|watch`."""
    twin = commands.add_parser("twin", help="device twins and their change feed")
    sub = twin.add_subparsers(dest="twin_command", required=True, metavar="ACTION")

    get = add_api_command(sub, "get", "show a device's twin: version, desired, reported, delta")
    get.add_argument("id", metavar="ID", help="device id or devices/ID")
    get.set_defaults(func=_get)

    set_desired = add_api_command(
        sub, "set-desired", "merge-patch the desired state of one device or of a selector"
    )
    set_desired.add_argument("id", metavar="ID", nargs="?", help="device id or devices/ID")
    set_desired.add_argument("--selector", metavar="SELECTOR", help="e.g. kind=lamp,district=n")
    set_desired.add_argument("--patch", metavar="JSON", help='a JSON object, e.g. {"power":true}')
    set_desired.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="PATH=VALUE",
        help="repeatable; dotted paths nest, VALUE is JSON if it parses, else a string",
    )
    set_desired.add_argument(
        "--expected-version", type=int, default=0, metavar="N", help="write only at version N"
    )
    set_desired.set_defaults(func=_set_desired)

    watch = add_api_command(sub, "watch", "stream twin and device changes (Ctrl-C stops)")
    watch.add_argument("--filter", default="", metavar="SELECTOR", help="device attributes only")
    watch.add_argument(
        "--after",
        default="",
        metavar="CURSOR",
        help="resume after this event cursor; 0 replays the retained feed (default: from now)",
    )
    watch.add_argument("--limit", type=positive_int, metavar="N", help="stop after N events")
    watch.set_defaults(func=_watch)
