"""`citytwin simulate`: run simulated lamps, sensors and cameras against a running service.

Each simulated device is a real aiocoap client (see twin/simulator/): the command registers it
through gRPC as an installer would (so the token must be an installer's or an admin's), the
device enrolls over `coaps+tcp` with its one-time code, then reports, follows its desired
state (firmware jobs included: downloads, installs and reboots, failing at the `--fw-*` rates),
raises faults and goes offline as told. A progress bar follows the enrollments, then a
table of counters refreshed every second; without a terminal a summary line is printed every
few seconds instead. Ctrl-C or `--duration` stops the devices, and the final counters are
printed.

To trust the service's `coaps+tcp` certificate the devices need the fleet CA first: `--ca
FILE`, or else it is fetched from `crts` over plain UDP CoAP (`--coap-udp`, by default the
`--coap` host on port 5683), which authenticates nothing and is meant for test set-ups.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import secrets
import signal
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from rich.console import Console
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from twin.cli.api_client import add_api_command
from twin.cli.argument_types import (
    non_negative_int,
    positive_int,
    positive_seconds,
    probability,
)
from twin.cli.device_commands import parse_labels
from twin.errors import InvalidArgument, Unauthenticated
from twin.simulator.devices import (
    COAP_PORT,
    COAPS_PORT,
    DEFAULT_REBOOT_SECONDS,
    Behaviour,
    Endpoint,
    FleetCounters,
    SimulatorError,
    coap_uri,
    fetch_ca_over_udp,
    split_host_port,
)
from twin.simulator.fleet import (
    DEFAULT_ENROLL_CONCURRENCY,
    RUN_LABEL,
    Fleet,
    FleetPlan,
    GrpcInstaller,
)

# Exit codes: 1 when some devices never enrolled, 2 when the run could not start or was
# refused outright (bad token, role or scope), as for other failed API calls.
EXIT_PARTIAL: Final = 1
EXIT_FAILED: Final = 2
EXIT_INTERRUPTED: Final = 130
LIVE_REFRESH_SECONDS: Final = 1.0
PROGRESS_REFRESH_SECONDS: Final = 0.2
PLAIN_SUMMARY_SECONDS: Final = 5.0

# (label, counter) rows of the live table, in the order people read them.
SUMMARY_ROWS: Final = (
    ("devices", "devices"),
    ("enrolled", "enrolled"),
    ("enrollment failed", "enroll_failed"),
    ("connected now", "connected"),
    ("offline now", "offline"),
    ("reports ok", "reports_ok"),
    ("reports failed", "reports_failed"),
    ("telemetry packs", "telemetry"),
    ("heartbeats", "heartbeats"),
    ("desired changes applied", "desired_applied"),
    ("faults raised", "faults_raised"),
    ("faults cleared", "faults_cleared"),
    ("offline periods", "offline_periods"),
    ("connections lost", "disconnects"),
    ("refused by the service", "refused"),
    ("firmware downloads", "firmware_downloads"),
    ("firmware bytes downloaded", "firmware_bytes"),
    ("firmware updates succeeded", "updates_succeeded"),
    ("firmware updates failed", "updates_failed"),
)


def summary_line(counters: FleetCounters, elapsed: float) -> str:
    """One line of counters for logs and pipes."""
    c = counters
    return (
        f"{elapsed:6.1f}s enrolled {c.enrolled}/{c.devices}"
        f"{f' ({c.enroll_failed} failed)' if c.enroll_failed else ''}, "
        f"connected {c.connected}, offline {c.offline}, "
        f"reports {c.reports_ok} ok {c.reports_failed} failed, telemetry {c.telemetry}, "
        f"heartbeats {c.heartbeats}, desired applied {c.desired_applied}, "
        f"faults {c.faults_raised} raised {c.faults_cleared} cleared, "
        f"firmware {c.firmware_downloads} downloads ({c.firmware_bytes} bytes), "
        f"updates {c.updates_succeeded} ok {c.updates_failed} failed"
    )


def describe_plan(plan: FleetPlan) -> str:
    """`3 lamps, 1 sensor` for people."""
    counts = (("lamp", plan.lamps), ("sensor", plan.sensors), ("camera", plan.cameras))
    return ", ".join(f"{n} {kind}{'' if n == 1 else 's'}" for kind, n in counts if n)


def summary_table(counters: FleetCounters, elapsed: float, requests_per_second: float) -> Table:
    """The live table: every counter, and the current rate of successful requests."""
    table = Table(title=f"simulation, {elapsed:.0f} s", show_edge=False, header_style="bold")
    table.add_column("counter")
    table.add_column("value", justify="right")
    values = counters.snapshot()
    for label, key in SUMMARY_ROWS:
        table.add_row(label, str(values[key]))
    table.add_row("requests per second", f"{requests_per_second:.1f}")
    return table


def _fleet_plan(args: argparse.Namespace, seed: int) -> FleetPlan:
    if args.lamps + args.sensors + args.cameras == 0:
        raise InvalidArgument("nothing to simulate: give --lamps, --sensors or --cameras")
    labels = parse_labels(args.label)
    if RUN_LABEL in labels:
        raise InvalidArgument(f"--label {RUN_LABEL}=... is set by the simulator itself")
    return FleetPlan(
        lamps=args.lamps,
        sensors=args.sensors,
        cameras=args.cameras,
        labels=labels,
        seed=seed,
        enroll_concurrency=args.enroll_concurrency,
    )


def _host_port(text: str, default_port: int, option: str) -> tuple[str, int]:
    try:
        return split_host_port(text, default_port)
    except ValueError as error:
        raise InvalidArgument(f"{option}: {error}") from None


def _read_ca(path: Path) -> bytes:
    try:
        pem = path.read_bytes()
        x509.load_pem_x509_certificates(pem)
    except OSError as error:
        raise InvalidArgument(f"cannot read --ca {path}: {error.strerror}") from None
    except ValueError:
        raise InvalidArgument(f"--ca {path} holds no PEM certificate") from None
    return pem


async def _fetch_ca(host: str, port: int) -> bytes:
    pem = await fetch_ca_over_udp(host, port)
    root = x509.load_pem_x509_certificates(pem)[-1]
    fingerprint = hashlib.sha256(root.public_bytes(serialization.Encoding.DER)).hexdigest()
    print(
        f"citytwin: trusting the CA from {coap_uri('coap', host, port, '')} unverified "
        f"(plain CoAP); its root's SHA-256 is {fingerprint}",
        file=sys.stderr,
    )
    return pem


def _stop_on_signals(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    """Ctrl-C (or SIGTERM) asks the devices to stop; a second Ctrl-C interrupts at once."""

    def first(sig: signal.Signals) -> None:
        stop.set()
        # With the handler gone, a second Ctrl-C is Python's KeyboardInterrupt again.
        loop.remove_signal_handler(sig)

    for sig in (signal.SIGINT, signal.SIGTERM):
        # Not every platform lets asyncio handle signals (Windows); Ctrl-C then interrupts.
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, first, sig)


async def _show_enrollment(fleet: Fleet, runner: asyncio.Task[None], console: Console) -> None:
    progress = Progress(
        TextColumn("enrolling"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[failed]}"),
        TimeElapsedColumn(),
        console=console,
        auto_refresh=False,
        transient=False,
    )
    with progress:
        task = progress.add_task("enrolling", total=fleet.counters.devices, failed="")
        while True:
            c = fleet.counters
            failed = f"{c.enroll_failed} failed" if c.enroll_failed else ""
            progress.update(task, completed=c.enrolled + c.enroll_failed, failed=failed)
            progress.refresh()
            if runner.done() or fleet.enrollment_finished:
                return
            await asyncio.wait({runner}, timeout=PROGRESS_REFRESH_SECONDS)


async def _show_live(
    fleet: Fleet, runner: asyncio.Task[None], console: Console, started: float
) -> None:
    loop = asyncio.get_running_loop()

    def answered() -> int:
        return fleet.counters.reports_ok + fleet.counters.heartbeats

    last_count, last_time = answered(), loop.time()

    def table() -> Table:
        nonlocal last_count, last_time
        now = loop.time()
        rate = (answered() - last_count) / max(now - last_time, 1e-9)
        last_count, last_time = answered(), now
        return summary_table(fleet.counters, now - started, rate)

    with Live(table(), console=console, auto_refresh=False) as live:
        while not runner.done():
            await asyncio.wait({runner}, timeout=LIVE_REFRESH_SECONDS)
            live.update(table(), refresh=True)


async def _show_plain(
    fleet: Fleet, runner: asyncio.Task[None], started: float, quiet: bool
) -> None:
    loop = asyncio.get_running_loop()
    while not runner.done():
        await asyncio.wait({runner}, timeout=PLAIN_SUMMARY_SECONDS)
        if not runner.done() and not quiet:
            print(summary_line(fleet.counters, loop.time() - started), flush=True)


def _final_report(args: argparse.Namespace, fleet: Fleet, elapsed: float) -> None:
    if args.json:
        result: Mapping[str, Any] = {
            "run": fleet.plan.run_id,
            "seed": fleet.plan.seed,
            "seconds": round(elapsed, 3),
            "counters": fleet.counters.snapshot(),
            "problems": fleet.problems,
        }
        print(json.dumps(result, indent=2))
    else:
        print(f"final: {summary_line(fleet.counters, elapsed).strip()}", flush=True)
    for problem in fleet.problems:
        print(f"citytwin: {problem}", file=sys.stderr)


async def _simulate_async(args: argparse.Namespace, plan: FleetPlan, behaviour: Behaviour) -> int:
    host, port = _host_port(args.coap, COAPS_PORT, "--coap")
    if args.ca is not None:
        trust = _read_ca(args.ca)
    else:
        udp_host, udp_port = _host_port(args.coap_udp or host, COAP_PORT, "--coap-udp")
        trust = await _fetch_ca(udp_host, udp_port)
    try:
        tls_ca = args.tls_ca.read_bytes() if args.tls_ca is not None else None
    except OSError as error:
        raise InvalidArgument(f"cannot read --tls-ca {args.tls_ca}: {error.strerror}") from None
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    _stop_on_signals(loop, stop)
    console = Console(stderr=False)
    interactive = console.is_terminal and not args.json
    kinds = describe_plan(plan)
    print(
        f"simulation {plan.run_id} (seed {plan.seed}): {kinds} against "
        f"{coap_uri('coaps+tcp', host, port, '')}, labelled {RUN_LABEL}={plan.run_id}",
        file=sys.stderr if args.json else sys.stdout,
        flush=True,
    )
    async with GrpcInstaller(args.address, args.token, tls_ca) as installer:
        fleet = Fleet(plan, behaviour, Endpoint(host, port, trust), installer)
        started = loop.time()
        runner = asyncio.create_task(fleet.run(stop))
        if args.duration is not None:
            loop.call_later(args.duration, stop.set)
        try:
            if interactive:
                await _show_enrollment(fleet, runner, console)
                await _show_live(fleet, runner, console, started)
            else:
                await _show_plain(fleet, runner, started, quiet=args.json)
        finally:
            stop.set()
            await runner
        elapsed = loop.time() - started
    if fleet.fatal is not None:
        print(f"citytwin: {fleet.fatal}", file=sys.stderr)
        return EXIT_FAILED
    _final_report(args, fleet, elapsed)
    return EXIT_PARTIAL if fleet.counters.enroll_failed else 0


def _simulate(args: argparse.Namespace) -> int:
    if not args.token:
        raise Unauthenticated("no API token: pass --token or set CITYTWIN_TOKEN")
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    plan = _fleet_plan(args, seed)
    behaviour = Behaviour(
        interval=args.interval,
        fault_rate=args.fault_rate,
        offline_rate=args.offline_rate,
        offline_seconds=args.offline_seconds or 0.0,
        fw_integrity_failure_rate=args.fw_integrity_failure_rate,
        fw_connection_loss_rate=args.fw_connection_loss_rate,
        fw_install_failure_rate=args.fw_install_failure_rate,
        fw_revert_rate=args.fw_revert_rate,
        reboot_seconds=args.reboot_seconds,
    )
    # aiocoap warns about every connection that ends after its client context was shut down,
    # which happens all the time here (devices going offline); the counters tell the story.
    logging.getLogger("coap").setLevel(logging.ERROR)
    try:
        return asyncio.run(_simulate_async(args, plan, behaviour))
    except SimulatorError as error:
        print(f"citytwin: {error}", file=sys.stderr)
        return EXIT_FAILED


def register(commands: Any) -> None:
    """Add `simulate`."""
    simulate = add_api_command(
        commands, "simulate", "run simulated lamps, sensors and cameras against the service"
    )
    fleet = simulate.add_argument_group("devices")
    for option, what in (("--lamps", "lamps"), ("--sensors", "sensors"), ("--cameras", "cameras")):
        fleet.add_argument(
            option,
            type=non_negative_int,
            default=0,
            metavar="N",
            help=f"how many {what} (default 0)",
        )
    fleet.add_argument(
        "--interval",
        type=positive_seconds,
        default=10.0,
        metavar="S",
        help="seconds between reports (%(default)g)",
    )
    fleet.add_argument(
        "--fault-rate",
        type=probability,
        default=0.01,
        metavar="P",
        help="probability of raising a fault at each report (%(default)g)",
    )
    fleet.add_argument(
        "--offline-rate",
        type=probability,
        default=0.0,
        metavar="P",
        help="probability of going offline at each report (%(default)g)",
    )
    fleet.add_argument(
        "--offline-seconds",
        type=positive_seconds,
        metavar="S",
        help="mean length of an offline period (default: five intervals)",
    )
    fleet.add_argument(
        "--label", action="append", default=[], metavar="KEY=VALUE", help="repeatable"
    )
    fleet.add_argument(
        "--seed", type=int, metavar="N", help="repeat a run's behaviour (default: random)"
    )
    fleet.add_argument(
        "--enroll-concurrency",
        type=positive_int,
        default=DEFAULT_ENROLL_CONCURRENCY,
        metavar="N",
        help="enrollments in flight at once (%(default)d)",
    )
    fleet.add_argument(
        "--duration",
        type=positive_seconds,
        metavar="S",
        help="stop after S seconds (default: Ctrl-C)",
    )
    firmware = simulate.add_argument_group("firmware updates (jobs come from campaigns)")
    for option, what in (
        ("--fw-integrity-failure-rate", "a download arrives corrupted (its digest will not match)"),
        ("--fw-connection-loss-rate", "the connection drops part way through a download"),
        ("--fw-install-failure-rate", "an installation fails before the reboot"),
        ("--fw-revert-rate", "the bootloader falls back to the old image after the reboot"),
    ):
        firmware.add_argument(
            option,
            type=probability,
            default=0.0,
            metavar="P",
            help=f"probability that {what} (%(default)g)",
        )
    firmware.add_argument(
        "--reboot-seconds",
        type=positive_seconds,
        default=DEFAULT_REBOOT_SECONDS,
        metavar="S",
        help="how long a device is away rebooting into new firmware (%(default)g)",
    )
    coap = simulate.add_argument_group("devices' connection")
    coap.add_argument(
        "--coap",
        default=f"127.0.0.1:{COAPS_PORT}",
        metavar="HOST:PORT",
        help="the service's coaps+tcp endpoint (%(default)s)",
    )
    coap.add_argument(
        "--coap-udp",
        metavar="HOST:PORT",
        help=f"fetch the fleet CA over plain CoAP here (default: the --coap host, {COAP_PORT})",
    )
    coap.add_argument(
        "--ca", type=Path, metavar="FILE", help="the fleet CA certificates (PEM) to trust instead"
    )
    simulate.epilog = (
        f"Devices are labelled {RUN_LABEL}=RUN besides --label. Exit status: 0, or "
        f"{EXIT_PARTIAL} if some devices never enrolled, or {EXIT_FAILED} if the run could not "
        "start (no CA, a token that may not create enrollments)."
    )
    simulate.set_defaults(func=_simulate)
