"""`citytwin energy`: energy per day and label value, e.g. per district."""

from __future__ import annotations

import argparse
from datetime import date
from typing import Any

from citytwin.v1 import twins_pb2 as t
from twin.cli.api_client import ApiClient, add_api_command, api_command
from twin.cli.output import message_to_dict, print_json, print_table


@api_command
def _energy(args: argparse.Namespace, api: ApiClient) -> int:
    request = t.SummarizeEnergyRequest(
        group_by_label=args.by,
        filter=args.filter,
        start_date=args.start or date.today().isoformat(),
        end_date=args.end,
        time_zone=args.tz,
    )
    response = api.call(api.twins.SummarizeEnergy, request)
    if args.json:
        print_json([message_to_dict(row) for row in response.rows])
        return 0
    print_table(
        [
            {
                args.by: row.group or "(none)",
                "day": row.date,
                "kWh": f"{row.energy_wh / 1000:.3f}",
                "devices": str(row.devices),
            }
            for row in response.rows
        ],
        [args.by, "day", "kWh", "devices"],
    )
    return 0


def register(commands: Any) -> None:
    """Add `energy`."""
    energy = add_api_command(commands, "energy", "energy used per day, grouped by a label")
    energy.add_argument("--by", required=True, metavar="LABEL", help="e.g. district")
    energy.add_argument("--from", dest="start", default="", metavar="YYYY-MM-DD", help="today")
    energy.add_argument("--to", dest="end", default="", metavar="YYYY-MM-DD", help="= --from")
    energy.add_argument("--filter", default="kind=lamp", metavar="SELECTOR")
    energy.add_argument("--tz", default="", metavar="ZONE", help="e.g. Europe/Amsterdam (UTC)")
    energy.set_defaults(func=_energy)
