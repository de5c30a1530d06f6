"""`citytwin campaign ...`: rolling a firmware artifact out to the fleet in waves, and steering
the rollout (start, pause, resume, abort, roll back) while following its progress.

`campaign watch` is meant for scripts and release pipelines as much as for people: it follows
the campaign until it needs no more watching and says how it ended in its exit code
(`EXIT_COMPLETED`, `EXIT_ABORTED`, `EXIT_PAUSED`)."""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn
from rich.text import Text

from citytwin.v1 import firmware_pb2 as f
from firmware_ota.rollout_waves import DEFAULT_WAVES, FailureAction, WaveSpec, parse_waves
from twin.cli.api_client import ApiClient, add_api_command, api_command, follow
from twin.cli.argument_types import positive_int, probability
from twin.cli.firmware_commands import artifact_name, resource_name
from twin.cli.output import (
    message_to_dict,
    print_json,
    print_key_values,
    print_table,
    short_name,
    show_all,
    time_of,
)
from twin.cli.provisioning_commands import EXIT_INTERRUPTED, collect

EXIT_COMPLETED = 0
EXIT_ABORTED = 1
# A paused campaign waits for a person (a failed wave, an approval, an operator's pause).
EXIT_PAUSED = 3

CAMPAIGN_COLUMNS = ["id", "name", "state", "artifact", "target", "created", "ended"]
WAVE_COLUMNS = [
    "wave",
    "extent",
    "target",
    "pending",
    "in progress",
    "succeeded",
    "failed",
    "timed out",
    "skipped",
    "cancelled",
    "status",
]
EXECUTION_COLUMNS = ["device", "wave", "state", "from", "attempt", "progress", "reason", "updated"]
EVENT_COLUMNS = ["time", "action", "actor", "detail"]
_FAILURE_ACTIONS = {
    action: f.FailureAction.Value(f"FAILURE_ACTION_{action.name}") for action in FailureAction
}
_EXIT_CODES = {
    f.CAMPAIGN_STATE_COMPLETED: EXIT_COMPLETED,
    f.CAMPAIGN_STATE_ABORTED: EXIT_ABORTED,
    f.CAMPAIGN_STATE_PAUSED: EXIT_PAUSED,
}
_DIGITS = re.compile(r"[0-9]+")


def campaign_name(text: str) -> str:
    """`campaigns/{id}` for `ID` or `campaigns/ID`."""
    return resource_name("campaigns", text, "a campaign id", _DIGITS)


def state_name(state: f.CampaignState.ValueType) -> str:
    """A campaign state for people: `running`."""
    return f.CampaignState.Name(state).removeprefix("CAMPAIGN_STATE_").lower()


def execution_state_name(state: f.ExecutionState.ValueType) -> str:
    """An execution state for people: `timed-out`."""
    return f.ExecutionState.Name(state).removeprefix("EXECUTION_STATE_").lower().replace("_", "-")


# `--state` of `campaign executions`.
EXECUTION_STATES = {
    execution_state_name(value): value
    for value in f.ExecutionState.values()
    if value != f.EXECUTION_STATE_UNSPECIFIED
}


# --- arguments ------------------------------------------------------------------------------


def ramp(text: str) -> f.RateLimits:
    """`BASE,FACTOR,EVERY`: start BASE devices a minute, times FACTOR each time EVERY more
    devices have succeeded."""
    try:
        base_text, factor_text, every_text = text.split(",")
        base, factor, every = float(base_text), float(factor_text), int(every_text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"wants BASE,FACTOR,EVERY such as 1,2,10, got {text!r}"
        ) from None
    if not (base > 0 and factor > 1 and every >= 1):
        raise argparse.ArgumentTypeError(f"wants BASE > 0, FACTOR > 1 and EVERY >= 1, got {text!r}")
    return f.RateLimits(ramp_base_per_minute=base, ramp_factor=factor, ramp_every_succeeded=every)


def waves_from_args(args: argparse.Namespace) -> tuple[WaveSpec, ...]:
    """The waves of `--waves` (default 1%,10%,50%,100%) with the per-wave options applied to
    every wave; InvalidArgument, naming the wave, for a bad plan."""
    waves = DEFAULT_WAVES if args.waves is None else parse_waves(args.waves)
    overrides: dict[str, Any] = {
        field: getattr(args, field)
        for field in ("success_threshold", "failure_threshold", "min_finished")
        if getattr(args, field) is not None
    }
    if args.on_failure is not None:
        overrides["on_failure"] = FailureAction(args.on_failure)
    if args.approval:
        overrides["approval_required"] = True
    return tuple(dataclasses.replace(wave, **overrides) for wave in waves)


def wave_message(wave: WaveSpec) -> f.Wave:
    """A wave as the API takes it."""
    return f.Wave(
        percent=wave.percent or 0.0,
        device_count=wave.device_count or 0,
        success_threshold=wave.success_threshold,
        failure_threshold=wave.failure_threshold,
        min_finished=wave.min_finished,
        on_failure=_FAILURE_ACTIONS[wave.on_failure],
        approval_required=wave.approval_required,
    )


def campaign_from_args(args: argparse.Namespace) -> f.Campaign:
    """The campaign `campaign create` describes."""
    limits = f.RateLimits(
        max_concurrent=args.max_concurrent, starts_per_minute=args.starts_per_minute
    )
    if args.ramp is not None:
        limits.MergeFrom(args.ramp)
    return f.Campaign(
        display_name=args.name,
        artifact=artifact_name(args.artifact),
        target_filter=args.target,
        continuous=args.continuous,
        waves=[wave_message(wave) for wave in waves_from_args(args)],
        rate_limits=limits,
        device_timeout_seconds=args.timeout,
        max_attempts=args.max_attempts,
        retry_backoff_seconds=args.retry_backoff,
        download_windows=args.download_window,
        install_windows=args.install_window,
        time_zone=args.time_zone,
        allow_downgrade=args.allow_downgrade,
    )


# --- showing campaigns ----------------------------------------------------------------------


def campaign_fields(campaign: f.Campaign) -> dict[str, str]:
    """A campaign's fields for people (the waves in their own table)."""
    limits = campaign.rate_limits
    return {
        "campaign": campaign.name,
        "name": campaign.display_name,
        "state": state_name(campaign.state),
        "reason": campaign.state_reason,
        "artifact": short_name(campaign.artifact),
        "target": campaign.target_filter + (" (continuous)" if campaign.continuous else ""),
        "current wave": str(campaign.current_wave + 1) if campaign.wave_status else "",
        "max concurrent": str(limits.max_concurrent or "no limit"),
        "starts per minute": str(limits.starts_per_minute or "no limit"),
        "download windows": ", ".join(campaign.download_windows) or "any time",
        "install windows": ", ".join(campaign.install_windows) or "any time",
        "time zone": campaign.time_zone or "the service's",
        "allow downgrade": "yes" if campaign.allow_downgrade else "no",
        "rollback of": campaign.rollback_of,
        "created": time_of(campaign, "create_time"),
        "started": time_of(campaign, "start_time"),
        "ended": time_of(campaign, "end_time"),
        "created by": campaign.created_by,
    }


def campaign_row(campaign: f.Campaign) -> dict[str, str]:
    """One line of the campaign list."""
    return {
        "id": short_name(campaign.name),
        "name": campaign.display_name,
        "state": state_name(campaign.state),
        "artifact": short_name(campaign.artifact),
        "target": campaign.target_filter,
        "created": time_of(campaign, "create_time"),
        "ended": time_of(campaign, "end_time"),
    }


def _extent(wave: f.Wave) -> str:
    return f"{wave.percent:g}%" if wave.percent else str(wave.device_count)


def _count_cells(counts: f.ExecutionCounts) -> dict[str, str]:
    return {
        "pending": str(counts.pending),
        "in progress": str(counts.in_progress),
        "succeeded": str(counts.succeeded),
        "failed": str(counts.failed),
        "timed out": str(counts.timed_out),
        "skipped": str(counts.skipped),
        "cancelled": str(counts.cancelled),
    }


def wave_rows(campaign: f.Campaign) -> list[dict[str, str]]:
    """The per-wave table of `campaign status`, with a totals line. Before the campaign
    starts the waves have no devices yet: their extents only."""
    rows = []
    for index, wave in enumerate(campaign.waves):
        row = {"wave": str(index + 1), "extent": _extent(wave), "status": "pending"}
        if index < len(campaign.wave_status):
            status = campaign.wave_status[index]
            row |= _count_cells(status.counts)
            row |= {"target": str(status.target_count), "status": status.status}
        rows.append(row)
    if campaign.wave_status:
        rows.append({"wave": "total", "target": str(campaign.counts.total)})
        rows[-1] |= _count_cells(campaign.counts)
    return rows


def print_campaign(campaign: f.Campaign, as_json: bool) -> None:
    """A campaign's fields and its waves, or the message as JSON."""
    if as_json:
        print_json(message_to_dict(campaign))
        return
    print_key_values(list(campaign_fields(campaign).items()))
    print()
    print_table(wave_rows(campaign), WAVE_COLUMNS)


def wave_counts_text(counts: f.ExecutionCounts) -> str:
    """The states of a wave's (or a campaign's) devices in a few words, zeros left out."""
    parts = [
        (counts.succeeded, "succeeded"),
        (counts.failed, "failed"),
        (counts.timed_out, "timed out"),
        (counts.skipped, "skipped"),
        (counts.cancelled, "cancelled"),
        (counts.in_progress, "in progress"),
        (counts.pending, "pending"),
    ]
    return ", ".join(f"{number} {what}" for number, what in parts if number) or "no devices"


def progress_line(campaign: f.Campaign) -> str:
    """One line per update of `campaign watch` when no progress bars are shown."""
    waves = len(campaign.wave_status)
    wave = f" wave {campaign.current_wave + 1}/{waves}" if waves else ""
    reason = f" ({campaign.state_reason})" if campaign.state_reason else ""
    counts = wave_counts_text(campaign.counts)
    return f"{state_name(campaign.state)}{wave}: {counts}{reason}"


# --- commands -------------------------------------------------------------------------------


@api_command
def _create(args: argparse.Namespace, api: ApiClient) -> int:
    service = api.campaigns
    request = f.CreateCampaignRequest(campaign=campaign_from_args(args))
    campaign = api.call(service.CreateCampaign, request)
    if args.start:
        # Should the start be refused, the draft stays: say which one it is.
        print(f"created {campaign.name}", file=sys.stderr)
        campaign = api.call(service.StartCampaign, f.CampaignActionRequest(name=campaign.name))
    print_campaign(campaign, args.json)
    return 0


@api_command
def _action(args: argparse.Namespace, api: ApiClient) -> int:
    service = api.campaigns
    method = {
        "start": service.StartCampaign,
        "pause": service.PauseCampaign,
        "resume": service.ResumeCampaign,
        "abort": service.AbortCampaign,
    }[args.campaign_command]
    request = f.CampaignActionRequest(name=campaign_name(args.campaign), reason=args.reason)
    print_campaign(api.call(method, request), args.json)
    return 0


@api_command
def _rollback(args: argparse.Namespace, api: ApiClient) -> int:
    request = f.RollbackCampaignRequest(
        name=campaign_name(args.campaign), artifact=artifact_name(args.artifact)
    )
    campaign = api.call(api.campaigns.RollbackCampaign, request)
    print_campaign(campaign, args.json)
    if not args.json:
        print(f"\nstart it with: citytwin campaign start {short_name(campaign.name)}")
    return 0


@api_command
def _status(args: argparse.Namespace, api: ApiClient) -> int:
    request = f.GetCampaignRequest(name=campaign_name(args.campaign))
    print_campaign(api.call(api.campaigns.GetCampaign, request), args.json)
    return 0


@api_command
def _list(args: argparse.Namespace, api: ApiClient) -> int:
    def fetch(size: int, token: str) -> tuple[Iterable[f.Campaign], str]:
        request = f.ListCampaignsRequest(page_size=size, page_token=token)
        response = api.call(api.campaigns.ListCampaigns, request)
        return response.campaigns, response.next_page_token

    campaigns, token = collect(fetch, every=args.all)
    show_all(campaigns, campaign_row, CAMPAIGN_COLUMNS, args.json)
    if token:
        print("citytwin: more campaigns: --all", file=sys.stderr)
    return 0


def execution_row(execution: f.Execution) -> dict[str, str]:
    """One line of the execution list."""
    return {
        "device": short_name(execution.device),
        "wave": str(execution.wave + 1),
        "state": execution_state_name(execution.state),
        "from": execution.from_version,
        "attempt": str(execution.attempt),
        "progress": f"{execution.progress}%",
        "reason": ": ".join(filter(None, (execution.failure_reason, execution.detail))),
        "updated": time_of(execution, "update_time"),
    }


@api_command
def _executions(args: argparse.Namespace, api: ApiClient) -> int:
    def fetch(size: int, token: str) -> tuple[Iterable[f.Execution], str]:
        request = f.ListExecutionsRequest(
            parent=campaign_name(args.campaign),
            page_size=size,
            page_token=token,
            state=EXECUTION_STATES[args.state] if args.state else f.EXECUTION_STATE_UNSPECIFIED,
        )
        response = api.call(api.campaigns.ListExecutions, request)
        return response.executions, response.next_page_token

    executions, token = collect(fetch, limit=args.limit)
    show_all(executions, execution_row, EXECUTION_COLUMNS, args.json)
    if token:
        print(f"citytwin: more executions than --limit {args.limit}", file=sys.stderr)
    return 0


def event_row(event: f.CampaignEvent) -> dict[str, str]:
    """One line of a campaign's audit log."""
    return {
        "time": time_of(event, "time"),
        "action": event.action,
        "actor": event.actor,
        "detail": event.detail,
    }


@api_command
def _events(args: argparse.Namespace, api: ApiClient) -> int:
    def fetch(size: int, token: str) -> tuple[Iterable[f.CampaignEvent], str]:
        request = f.ListCampaignEventsRequest(
            parent=campaign_name(args.campaign), page_size=size, page_token=token
        )
        response = api.call(api.campaigns.ListCampaignEvents, request)
        return response.events, response.next_page_token

    events, _ = collect(fetch, every=True)
    show_all(events, event_row, EVENT_COLUMNS, args.json)
    return 0


# --- watch ----------------------------------------------------------------------------------


class _Settled(Exception):
    """The watched campaign needs no more watching; ends `follow` with an exit code."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


@contextmanager
def _wave_bars(visible: bool) -> Iterator[Progress | None]:
    """Progress bars, one per wave, for a person at a terminal; None otherwise."""
    if not visible:
        yield None
        return
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), transient=False
    ) as bars:
        yield bars


def _show_bars(bars: Progress, tasks: dict[int, TaskID], campaign: f.Campaign) -> None:
    for status in campaign.wave_status:
        counts = status.counts
        description = f"wave {status.index + 1} {status.status}: {wave_counts_text(counts)}"
        # Skipped and cancelled devices are done with too: the bar shows what is left.
        done = counts.total - counts.pending - counts.in_progress
        task = tasks.get(status.index)
        if task is None:
            task = tasks[status.index] = bars.add_task(description)
        bars.update(task, description=description, total=counts.total, completed=done)


def _headline(campaign: f.Campaign) -> str:
    reason = f": {campaign.state_reason}" if campaign.state_reason else ""
    return f"{state_name(campaign.state)}{reason}"


@api_command
def _watch(args: argparse.Namespace, api: ApiClient) -> int:
    name = campaign_name(args.campaign)
    call = api.stream(api.campaigns.WatchCampaign, f.GetCampaignRequest(name=name))
    tasks: dict[int, TaskID] = {}
    headline = ""
    with _wave_bars(Console().is_terminal and not args.json) as bars:

        def update(campaign: f.Campaign) -> None:
            nonlocal headline
            if args.json:
                print_json(message_to_dict(campaign), compact=True)
            elif bars is None:
                print(progress_line(campaign), flush=True)
            else:
                _show_bars(bars, tasks, campaign)
                if _headline(campaign) != headline:
                    # A reason may hold brackets: plain text, not console markup.
                    bars.console.print(Text(_headline(campaign)))
            headline = _headline(campaign)
            if campaign.state in _EXIT_CODES:
                raise _Settled(_EXIT_CODES[campaign.state])

        try:
            follow(call, update, 0)
        except _Settled as settled:
            if settled.code == EXIT_PAUSED:
                resume = f"citytwin campaign resume {short_name(name)}"
                print(f"citytwin: {name} is {headline}; resume with `{resume}`", file=sys.stderr)
            elif settled.code == EXIT_ABORTED:
                print(f"citytwin: {name} was {headline}", file=sys.stderr)
            return settled.code
    # `follow` returns only when the person stopped watching: a stream that the server ends
    # delivers a completed or aborted campaign first.
    return EXIT_INTERRUPTED


# --- registration ---------------------------------------------------------------------------


def _add_campaign_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("campaign", metavar="ID", help="campaign id or campaigns/ID")


def _register_create(sub: Any) -> None:
    create = add_api_command(sub, "create", "create a rollout campaign (in state draft)")
    create.add_argument("--artifact", required=True, metavar="SHA256", help="what to install")
    create.add_argument(
        "--target", required=True, metavar="SELECTOR", help="e.g. kind=lamp,district=north"
    )
    create.add_argument("--name", default="", metavar="N", help="a human name")
    create.add_argument(
        "--waves", metavar="PLAN", help='cumulative extents (default "1%%,10%%,50%%,100%%")'
    )
    waves = create.add_argument_group("every wave (default: the service's)")
    waves.add_argument("--success-threshold", type=probability, metavar="FRACTION")
    waves.add_argument("--failure-threshold", type=probability, metavar="FRACTION")
    waves.add_argument("--min-finished", type=positive_int, metavar="N")
    waves.add_argument("--on-failure", choices=[action.value for action in FailureAction])
    waves.add_argument(
        "--approval", action="store_true", help="wait for `campaign resume` after each wave"
    )
    rates = create.add_argument_group("pace (default: no limits)")
    for option, metavar, help_text in (
        ("--max-concurrent", "N", "devices updating at once"),
        ("--starts-per-minute", "N", "devices started a minute"),
        ("--timeout", "SECONDS", "for one attempt of a device (default 3600)"),
        ("--max-attempts", "N", "per device, for transient failures (default 3)"),
        ("--retry-backoff", "SECONDS", "before the first retry, then doubled (default 60)"),
    ):
        rates.add_argument(option, type=positive_int, default=0, metavar=metavar, help=help_text)
    rates.add_argument(
        "--ramp",
        type=ramp,
        metavar="BASE,FACTOR,EVERY",
        help="start BASE a minute, times FACTOR each time EVERY more succeeded",
    )
    windows = create.add_argument_group("maintenance windows (local time)")
    for option in ("--download-window", "--install-window"):
        windows.add_argument(
            option, action="append", default=[], metavar="WINDOW", help='e.g. "22:00-06:00"'
        )
    windows.add_argument("--time-zone", default="", metavar="ZONE", help="e.g. Europe/Berlin")
    create.add_argument("--allow-downgrade", action="store_true")
    create.add_argument("--continuous", action="store_true", help="add devices matching later")
    create.add_argument("--start", action="store_true", help="start it right away")
    create.set_defaults(func=_create)


def register(commands: Any) -> None:
    """Add `campaign create|start|pause|resume|abort|rollback|status|executions|events|list|
    watch`."""
    campaign = commands.add_parser("campaign", help="firmware rollout campaigns")
    sub = campaign.add_subparsers(dest="campaign_command", required=True, metavar="ACTION")
    _register_create(sub)

    for action, help_text in (
        ("start", "start a draft campaign"),
        ("pause", "start no further device until resumed"),
        ("resume", "resume a paused campaign (approves the next wave)"),
        ("abort", "stop a campaign for good"),
    ):
        command = add_api_command(sub, action, help_text)
        _add_campaign_argument(command)
        command.add_argument("--reason", default="", metavar="TEXT", help="for the audit log")
        command.set_defaults(func=_action)

    rollback = add_api_command(sub, "rollback", "create a campaign undoing this one's updates")
    _add_campaign_argument(rollback)
    rollback.add_argument("--artifact", required=True, metavar="SHA256", help="to go back to")
    rollback.set_defaults(func=_rollback)

    status = add_api_command(sub, "status", "state and per-wave progress")
    _add_campaign_argument(status)
    status.set_defaults(func=_status)

    executions = add_api_command(sub, "executions", "the per-device updates, in rollout order")
    _add_campaign_argument(executions)
    executions.add_argument("--state", choices=list(EXECUTION_STATES))
    executions.add_argument("--limit", type=positive_int, default=100, metavar="N")
    executions.set_defaults(func=_executions)

    events = add_api_command(sub, "events", "the campaign's audit log")
    _add_campaign_argument(events)
    events.set_defaults(func=_events)

    listing = add_api_command(sub, "list", "list campaigns, newest first")
    listing.add_argument("--all", action="store_true", help="fetch every page")
    listing.set_defaults(func=_list)

    watch = add_api_command(
        sub, "watch", "follow a campaign; exit 0 completed, 1 aborted, 3 paused"
    )
    _add_campaign_argument(watch)
    watch.set_defaults(func=_watch)
