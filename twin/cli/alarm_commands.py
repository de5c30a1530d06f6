"""`citytwin alarms ...`: faults devices report, for the people who fix them."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from citytwin.v1 import alarms_pb2 as a
from twin.cli.api_client import ApiClient, add_api_command, api_command, follow
from twin.cli.output import format_time, message_to_dict, print_json, print_key_values, print_table

COLUMNS = ["alarm", "device", "property", "severity", "active", "first seen", "last seen", "ack"]
_EVENTS = {
    a.ALARM_EVENT_TYPE_RAISED: "raised",
    a.ALARM_EVENT_TYPE_ACKNOWLEDGED: "acknowledged",
    a.ALARM_EVENT_TYPE_CLEARED: "cleared",
}


def alarm_name(text: str) -> str:
    """`alarms/{id}` for `ID` or `alarms/ID`."""
    return text if text.startswith("alarms/") else f"alarms/{text}"


def alarm_row(alarm: a.Alarm) -> dict[str, str]:
    """One line of the alarm table."""
    return {
        "alarm": alarm.name.removeprefix("alarms/"),
        "device": alarm.device.removeprefix("devices/"),
        "property": alarm.property,
        "severity": alarm.severity,
        "active": "yes" if alarm.active else "cleared " + format_time(alarm.clear_time),
        "first seen": format_time(alarm.first_seen_time),
        "last seen": format_time(alarm.last_seen_time),
        "ack": alarm.note or ("yes" if alarm.HasField("acknowledge_time") else ""),
    }


@api_command
def _list(args: argparse.Namespace, api: ApiClient) -> int:
    request = a.ListAlarmsRequest(
        filter=args.filter,
        active_only=not args.all_states,
        severity=args.severity,
        page_size=args.limit,
    )
    response = api.call(api.alarms.ListAlarms, request)
    if args.json:
        print_json([message_to_dict(alarm) for alarm in response.alarms])
    else:
        print_table([alarm_row(alarm) for alarm in response.alarms], COLUMNS)
    if response.next_page_token:
        print(f"citytwin: more alarms than --limit {args.limit}", file=sys.stderr)
    return 0


@api_command
def _ack(args: argparse.Namespace, api: ApiClient) -> int:
    request = a.AcknowledgeAlarmRequest(name=alarm_name(args.alarm), note=args.note)
    alarm = api.call(api.alarms.AcknowledgeAlarm, request)
    if args.json:
        print_json(message_to_dict(alarm))
    else:
        print_key_values(list(alarm_row(alarm).items()))
    return 0


@api_command
def _watch(args: argparse.Namespace, api: ApiClient) -> int:
    request = a.WatchAlarmsRequest(filter=args.filter, after_cursor=args.after)

    def show(event: a.AlarmEvent) -> None:
        if args.json:
            print_json(message_to_dict(event), compact=True)
            return
        alarm = event.alarm
        print(
            f"{event.cursor} {format_time(event.time)} {_EVENTS.get(event.type, '?')} "
            f"{alarm.device.removeprefix('devices/')} {alarm.property} {alarm.severity}",
            flush=True,
        )

    return follow(api.stream(api.alarms.WatchAlarms, request), show, args.limit)


def register(commands: Any) -> None:
    """Add `alarms list|ack|watch`."""
    alarms = commands.add_parser("alarms", help="faults reported by devices")
    sub = alarms.add_subparsers(dest="alarms_command", required=True, metavar="ACTION")

    listing = add_api_command(sub, "list", "list active alarms (newest first)")
    listing.add_argument("--filter", default="", metavar="SELECTOR", help="e.g. district=north")
    listing.add_argument(
        "--severity", default="", choices=["", "critical", "major", "minor", "warning"]
    )
    listing.add_argument("--all", dest="all_states", action="store_true", help="cleared ones too")
    listing.add_argument("--limit", type=int, default=100, metavar="N", help="at most N alarms")
    listing.set_defaults(func=_list)

    ack = add_api_command(sub, "ack", "acknowledge an alarm")
    ack.add_argument("alarm", metavar="ALARM", help="alarm id or alarms/ID")
    ack.add_argument("--note", default="", help="what is being done, e.g. 'crew sent'")
    ack.set_defaults(func=_ack)

    watch = add_api_command(sub, "watch", "follow alarms as they are raised and cleared")
    watch.add_argument("--filter", default="", metavar="SELECTOR")
    watch.add_argument("--after", default="", metavar="CURSOR", help="resume after a cursor")
    watch.add_argument("--limit", type=int, default=0, metavar="N", help="stop after N events")
    watch.set_defaults(func=_watch)
