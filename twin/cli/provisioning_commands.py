"""`citytwin install|enrollments|groups|certs|audit`: giving devices their identity through the
ProvisioningService. An installer registers a device and gets its one-time enrollment code
(`install`, optionally following the device until its first report); operators trust
manufacturers' CAs (`groups`), follow and revoke certificates and tune the policy (`certs`),
and read who did what (`audit`)."""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO, TypeVar

import grpc
import segno
from google.protobuf.field_mask_pb2 import FieldMask
from rich.console import Console
from rich.text import Text

from citytwin.v1 import devices_pb2 as d
from citytwin.v1 import provisioning_pb2 as p
from twin.cli.api_client import ApiClient, add_api_command, api_command, device_name
from twin.cli.argument_types import positive_int, positive_seconds
from twin.cli.device_commands import add_device_arguments, device_from_args
from twin.cli.output import (
    message_to_dict,
    print_json,
    print_key_values,
    short_name,
    show,
    show_all,
    time_of,
)
from twin.errors import InvalidArgument

# `install --wait` ends with 3 when the device did not become active (timed out, or was
# decommissioned meanwhile), and with 130 when the person stopped waiting, as for any Ctrl-C.
EXIT_NOT_ACTIVE = 3
EXIT_INTERRUPTED = 130
DEFAULT_WAIT_SECONDS = 1800.0
POLL_SECONDS = 1.0
# The service caps a page at this many items.
MAX_PAGE_SIZE = 1000
# A server that is restarting or briefly unreachable should not end a half-hour wait on site.
_TRANSIENT = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})

ENROLLMENT_STATES = {
    "pending": p.PENDING,
    "used": p.USED,
    "cancelled": p.CANCELLED,
    "expired": p.EXPIRED,
}
ENROLLMENT_COLUMNS = ["name", "device", "serial", "state", "created", "expires", "ended"]
GROUP_COLUMNS = ["id", "description", "ca subject", "ca sha256", "created"]
CERTIFICATE_COLUMNS = ["serial", "device", "state", "authorization", "not after", "issued"]
AUDIT_COLUMNS = ["time", "action", "ok", "device", "serial", "actor", "source", "detail"]
# (option, ProvisioningPolicy field, metavar, help) of `certs policy`; the field is the dest.
POLICY_OPTIONS = (
    ("--validity-days", "certificate_validity_days", "DAYS", "validity of new certificates"),
    ("--renewal-window-days", "renewal_window_days", "DAYS", "renewal opens before expiry; 0: any"),
    ("--default-code-ttl", "default_code_ttl_seconds", "SECONDS", "code lifetime when not told"),
    ("--max-code-ttl", "max_code_ttl_seconds", "SECONDS", "longest code lifetime allowed"),
)

# The lifecycle a device goes through on site, in order, with what each step means to the
# installer watching it.
INSTALL_STEPS = (d.REGISTERED, d.PROVISIONED, d.ACTIVE)
STEP_MESSAGES = {
    d.REGISTERED: "registered: waiting for the device to enroll with its code",
    d.PROVISIONED: "provisioned: certificate issued, waiting for the first report",
    d.ACTIVE: "active: first report received",
    d.DECOMMISSIONED: "decommissioned: the device was taken out of service",
}

Item = TypeVar("Item")


# --- names and values -------------------------------------------------------------------


def _name_in(collection: str, text: str, what: str) -> str:
    ident = text.strip().removeprefix(f"{collection}/")
    if not ident or "/" in ident:
        raise InvalidArgument(f"not {what} or {collection}/ID: {text!r}")
    return f"{collection}/{ident}"


def enrollment_name(text: str) -> str:
    """The resource name `enrollments/{id}` of `ID` or `enrollments/ID`."""
    name = _name_in("enrollments", text, "an enrollment id")
    if not name.removeprefix("enrollments/").isdigit():
        raise InvalidArgument(f"enrollment ids are numbers, got {text!r}")
    return name


def group_name(text: str) -> str:
    """The resource name `enrollmentGroups/{id}` of `ID` or `enrollmentGroups/ID`."""
    return _name_in("enrollmentGroups", text, "an enrollment group id")


def certificate_name(text: str) -> str:
    """The resource name `certificates/{serial}` of a serial number or `certificates/SERIAL`.

    The service names certificates by lower-case hex; serials copied from openssl come in
    upper case, sometimes with colons, so both are accepted."""
    serial = text.strip().removeprefix("certificates/").replace(":", "").lower()
    return _name_in("certificates", serial, "a certificate serial number")


def _enrollment_state(state: p.EnrollmentState.ValueType) -> str:
    return p.EnrollmentState.Name(state).lower()


def _certificate_state(state: p.CertificateState.ValueType) -> str:
    return p.CertificateState.Name(state).lower().removeprefix("certificate_")


# --- records: one dict per message; tables show some of its keys, `get` shows them all ----


def enrollment_fields(enrollment: p.Enrollment) -> dict[str, str]:
    """An enrollment's fields for people."""
    return {
        "name": enrollment.name,
        "device": short_name(enrollment.device),
        "serial": enrollment.serial_number,
        "state": _enrollment_state(enrollment.state),
        "created": time_of(enrollment, "create_time"),
        "expires": time_of(enrollment, "expire_time"),
        "ended": time_of(enrollment, "end_time"),
        "creator": enrollment.creator,
    }


def group_fields(group: p.EnrollmentGroup) -> dict[str, str]:
    """An enrollment group's fields for people (the PEM only in JSON)."""
    return {
        "id": short_name(group.name),
        "description": group.description,
        "ca subject": group.ca_subject,
        "ca sha256": group.ca_fingerprint,
        "created": time_of(group, "create_time"),
    }


def certificate_fields(certificate: p.Certificate) -> dict[str, str]:
    """A certificate's fields for people (the PEM only with `certs show --pem`)."""
    return {
        "serial": short_name(certificate.name),
        "device": short_name(certificate.device),
        "state": _certificate_state(certificate.state),
        "authorization": certificate.authorization,
        "not before": time_of(certificate, "not_before"),
        "not after": time_of(certificate, "not_after"),
        "issued": time_of(certificate, "issue_time"),
        "ended": time_of(certificate, "end_time"),
        "revocation reason": certificate.revocation_reason,
        "sha256": certificate.fingerprint,
    }


def audit_fields(event: p.AuditEvent) -> dict[str, str]:
    """An audit event's fields for people."""
    return {
        "time": time_of(event, "time"),
        "action": event.action,
        "ok": "yes" if event.success else "no",
        "device": short_name(event.device) if event.device else "",
        "serial": event.serial_number,
        "actor": event.actor,
        "source": event.source,
        "detail": event.detail,
    }


def policy_fields(policy: p.ProvisioningPolicy) -> dict[str, str]:
    """The provisioning policy for people."""
    return {
        "certificate validity (days)": str(policy.certificate_validity_days),
        "renewal window (days)": str(policy.renewal_window_days),
        "default code ttl (s)": str(policy.default_code_ttl_seconds),
        "max code ttl (s)": str(policy.max_code_ttl_seconds),
        # Unset while the defaults have never been changed.
        "updated": time_of(policy, "update_time") or "never (defaults)",
    }


def collect(
    fetch: Callable[[int, str], tuple[Iterable[Item], str]], *, every: bool = False, limit: int = 0
) -> tuple[list[Item], str]:
    """Items of successive pages, each fetched as `fetch(page_size, page_token)`: the first
    page, every page (`every`), or pages until `limit` items. Also returns the page token of
    what was left, empty when nothing was."""
    items: list[Item] = []
    token = ""
    while True:
        size = min(limit - len(items), MAX_PAGE_SIZE) if limit else 0
        page, token = fetch(size, token)
        items.extend(page)
        if not token or (len(items) >= limit if limit else not every):
            break
    return (items[:limit] if limit else items), token


def _hint_more(token: str, what: str, how: str) -> None:
    if token:
        print(f"citytwin: more {what}: {how}", file=sys.stderr)


# --- install -----------------------------------------------------------------------------


def _can_print(text: str, out: TextIO) -> bool:
    try:
        text.encode(out.encoding or "ascii")
    except (UnicodeEncodeError, LookupError):
        return False
    return True


def print_enrollment_code(response: p.CreateEnrollmentResponse, *, qr: bool) -> None:
    """Show a new enrollment for the installer: the device and enrollment, then the code on a
    line of its own (prominent on a terminal, plain for copying and scripts), then the code
    as a QR code for a phone or a commissioning tool to scan."""
    enrollment = response.enrollment
    print_key_values(
        [
            ("device", short_name(response.device.name)),
            ("serial", response.device.serial_number),
            ("enrollment", enrollment.name),
            ("expires", time_of(enrollment, "expire_time")),
        ]
    )
    console = Console(soft_wrap=True, highlight=False)
    console.print("\nEnrollment code (type it into the device, or scan it):")
    code = response.enrollment_code
    # On a terminal the code stands out as a wide, bold block; piped, it stays a bare line.
    styled = Text(f"   {code}   ", style="bold reverse") if console.is_terminal else Text(code)
    console.print(styled)
    if not qr:
        return
    # Always a full QR code: segno would pick a Micro QR for so short a text, which few phone
    # cameras read.
    matrix = segno.make_qr(code, error="m")
    if _can_print("█▀▄", sys.stdout):
        console.print()
        matrix.terminal(out=sys.stdout, compact=True)
    else:
        print("citytwin: no QR code: the terminal cannot show block characters", file=sys.stderr)


def progress_lines(
    previous: d.LifecycleState.ValueType | None, device: d.Device, now: datetime
) -> list[str]:
    """What to announce now that `device` is seen again, last seen in state `previous` (None:
    never seen): a timestamped line per lifecycle step reached. A step passed between two
    polls still gets its line, so the installer sees the whole story."""
    current = device.state
    if current == previous:
        return []
    steps = [current]
    if previous in INSTALL_STEPS and current in INSTALL_STEPS:
        start, end = INSTALL_STEPS.index(previous), INSTALL_STEPS.index(current)
        if start < end:
            steps = list(INSTALL_STEPS[start + 1 : end + 1])
    stamp = now.isoformat(timespec="seconds")
    return [
        f"{stamp} {STEP_MESSAGES.get(step) or d.LifecycleState.Name(step).lower()}"
        for step in steps
    ]


def _clock(seconds: float) -> str:
    minutes, rest = divmod(math.ceil(seconds), 60)
    return f"{minutes}:{rest:02d}"


def _poll(api: ApiClient, name: str) -> d.Device | None:
    """The device now, or None when the server cannot be reached for the moment."""
    try:
        return api.call(api.devices.GetDevice, d.GetDeviceRequest(name=name))
    except grpc.RpcError as error:
        if isinstance(error, grpc.Call) and error.code() in _TRANSIENT:
            return None
        raise


def wait_until_active(
    api: ApiClient, device: d.Device, timeout: float, out: TextIO, expires: str = ""
) -> int:
    """Poll the device every second, printing each lifecycle step it reaches to `out`, until
    it is ACTIVE (0), `timeout` seconds pass or it is decommissioned (EXIT_NOT_ACTIVE), or
    Ctrl-C (EXIT_INTERRUPTED)."""
    console = Console(file=out, soft_wrap=True, highlight=False)
    # A spinner only where a person watches; logs and pipes get just the step lines.
    status = console.status("waiting for the device") if console.is_terminal else None
    deadline = time.monotonic() + timeout
    seen: d.LifecycleState.ValueType | None = None
    unreachable = False
    try:
        with status or nullcontext():
            while True:
                for line in progress_lines(seen, device, datetime.now().astimezone()):
                    console.print(Text(line))
                seen = device.state
                if seen == d.ACTIVE:
                    return 0
                if seen == d.DECOMMISSIONED:
                    print(f"citytwin: {device.name} will not become active", file=sys.stderr)
                    return EXIT_NOT_ACTIVE
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                if status is not None:
                    waiting = "server unreachable, retrying" if unreachable else "waiting"
                    status.update(
                        f"{d.LifecycleState.Name(seen).lower()}: {waiting} "
                        f"({_clock(left)} left, Ctrl-C stops)"
                    )
                time.sleep(min(POLL_SECONDS, left))
                polled = _poll(api, device.name)
                unreachable = polled is None
                if polled is not None:
                    device = polled
    except KeyboardInterrupt:
        print(f"\ncitytwin: stopped waiting for {device.name}", file=sys.stderr)
        return EXIT_INTERRUPTED
    state = d.LifecycleState.Name(device.state).lower()
    # Only a device that has not enrolled yet can still use the code.
    still_enrolling = expires and device.state == d.REGISTERED
    until = f"; its code works until {expires}" if still_enrolling else ""
    print(
        f"citytwin: {device.name} did not become active within {timeout:g} s "
        f"(still {state}){until}",
        file=sys.stderr,
    )
    return EXIT_NOT_ACTIVE


@api_command
def _install(args: argparse.Namespace, api: ApiClient) -> int:
    request = p.CreateEnrollmentRequest(
        device=device_from_args(args), device_id=args.id, code_ttl_seconds=args.code_ttl
    )
    response = api.call(api.provisioning.CreateEnrollment, request)
    if args.json:
        print_json(message_to_dict(response))
    else:
        print_enrollment_code(response, qr=not args.no_qr)
    if not args.wait:
        return 0
    sys.stdout.flush()
    # With --json, stdout holds one JSON document; the progress goes beside it.
    out = sys.stderr if args.json else sys.stdout
    expires = time_of(response.enrollment, "expire_time")
    return wait_until_active(api, response.device, args.wait_timeout, out, expires)


# --- enrollments -------------------------------------------------------------------------


@api_command
def _enrollments_list(args: argparse.Namespace, api: ApiClient) -> int:
    def fetch(size: int, token: str) -> tuple[Iterable[p.Enrollment], str]:
        request = p.ListEnrollmentsRequest(
            page_size=size,
            page_token=token,
            device=device_name(args.device) if args.device else "",
            state=ENROLLMENT_STATES[args.state] if args.state else p.ENROLLMENT_STATE_UNSPECIFIED,
        )
        response = api.call(api.provisioning.ListEnrollments, request)
        return response.enrollments, response.next_page_token

    enrollments, token = collect(fetch, every=args.all)
    show_all(enrollments, enrollment_fields, ENROLLMENT_COLUMNS, args.json)
    _hint_more(token, "enrollments", "--all")
    return 0


@api_command
def _enrollments_get(args: argparse.Namespace, api: ApiClient) -> int:
    request = p.GetEnrollmentRequest(name=enrollment_name(args.enrollment))
    enrollment = api.call(api.provisioning.GetEnrollment, request)
    show(enrollment, enrollment_fields(enrollment), args.json)
    return 0


@api_command
def _enrollments_cancel(args: argparse.Namespace, api: ApiClient) -> int:
    request = p.CancelEnrollmentRequest(name=enrollment_name(args.enrollment))
    enrollment = api.call(api.provisioning.CancelEnrollment, request)
    show(enrollment, enrollment_fields(enrollment), args.json)
    return 0


# --- enrollment groups -------------------------------------------------------------------


@api_command
def _groups_create(args: argparse.Namespace, api: ApiClient) -> int:
    try:
        pem = Path(args.ca_cert).read_text()
    except OSError as error:
        raise InvalidArgument(f"cannot read --ca-cert ({error.strerror}): {args.ca_cert}") from None
    except UnicodeDecodeError:
        raise InvalidArgument(f"--ca-cert is not a PEM file: {args.ca_cert}") from None
    request = p.CreateEnrollmentGroupRequest(
        group_id=args.group,
        enrollment_group=p.EnrollmentGroup(description=args.description, ca_certificate_pem=pem),
    )
    group = api.call(api.provisioning.CreateEnrollmentGroup, request)
    show(group, group_fields(group), args.json)
    return 0


@api_command
def _groups_list(args: argparse.Namespace, api: ApiClient) -> int:
    def fetch(size: int, token: str) -> tuple[Iterable[p.EnrollmentGroup], str]:
        request = p.ListEnrollmentGroupsRequest(page_size=size, page_token=token)
        response = api.call(api.provisioning.ListEnrollmentGroups, request)
        return response.enrollment_groups, response.next_page_token

    # Manufacturers are few: always the whole list.
    groups, _ = collect(fetch, every=True)
    show_all(groups, group_fields, GROUP_COLUMNS, args.json)
    return 0


@api_command
def _groups_get(args: argparse.Namespace, api: ApiClient) -> int:
    request = p.GetEnrollmentGroupRequest(name=group_name(args.group))
    group = api.call(api.provisioning.GetEnrollmentGroup, request)
    show(group, group_fields(group), args.json)
    return 0


@api_command
def _groups_delete(args: argparse.Namespace, api: ApiClient) -> int:
    name = group_name(args.group)
    response = api.call(
        api.provisioning.DeleteEnrollmentGroup, p.DeleteEnrollmentGroupRequest(name=name)
    )
    if args.json:
        print_json(message_to_dict(response))
    else:
        print(f"deleted {name}")
    return 0


# --- certificates and policy -------------------------------------------------------------


@api_command
def _certs_list(args: argparse.Namespace, api: ApiClient) -> int:
    def fetch(size: int, token: str) -> tuple[Iterable[p.Certificate], str]:
        request = p.ListCertificatesRequest(
            page_size=size,
            page_token=token,
            device=device_name(args.device) if args.device else "",
        )
        response = api.call(api.provisioning.ListCertificates, request)
        return response.certificates, response.next_page_token

    certificates, token = collect(fetch, every=args.all)
    show_all(certificates, certificate_fields, CERTIFICATE_COLUMNS, args.json)
    _hint_more(token, "certificates", "--all")
    return 0


@api_command
def _certs_show(args: argparse.Namespace, api: ApiClient) -> int:
    request = p.GetCertificateRequest(name=certificate_name(args.serial))
    certificate = api.call(api.provisioning.GetCertificate, request)
    if args.pem:
        print(certificate.pem, end="")
    else:
        show(certificate, certificate_fields(certificate), args.json)
    return 0


@api_command
def _certs_revoke(args: argparse.Namespace, api: ApiClient) -> int:
    request = p.RevokeCertificateRequest(name=certificate_name(args.serial), reason=args.reason)
    certificate = api.call(api.provisioning.RevokeCertificate, request)
    show(certificate, certificate_fields(certificate), args.json)
    return 0


@api_command
def _certs_policy(args: argparse.Namespace, api: ApiClient) -> int:
    changes = {
        field: getattr(args, field)
        for _, field, _, _ in POLICY_OPTIONS
        if getattr(args, field) is not None
    }
    if changes:
        policy = p.ProvisioningPolicy()
        for field, value in changes.items():
            setattr(policy, field, value)
        request = p.UpdateProvisioningPolicyRequest(
            policy=policy, update_mask=FieldMask(paths=list(changes))
        )
        policy = api.call(api.provisioning.UpdateProvisioningPolicy, request)
    else:
        policy = api.call(api.provisioning.GetProvisioningPolicy, p.GetProvisioningPolicyRequest())
    show(policy, policy_fields(policy), args.json)
    return 0


# --- audit log ---------------------------------------------------------------------------


@api_command
def _audit(args: argparse.Namespace, api: ApiClient) -> int:
    def fetch(size: int, token: str) -> tuple[Iterable[p.AuditEvent], str]:
        request = p.ListAuditEventsRequest(
            page_size=size,
            page_token=token,
            device=device_name(args.device) if args.device else "",
        )
        response = api.call(api.provisioning.ListAuditEvents, request)
        return response.events, response.next_page_token

    events, token = collect(fetch, limit=args.limit)
    show_all(events, audit_fields, AUDIT_COLUMNS, args.json)
    _hint_more(token, "events", "raise --limit")
    return 0


# --- registration ------------------------------------------------------------------------


def _register_install(commands: Any) -> None:
    install = add_api_command(
        commands, "install", "register a device on site and get its one-time enrollment code"
    )
    add_device_arguments(install)
    install.add_argument(
        "--code-ttl",
        type=positive_int,
        default=0,
        metavar="SECONDS",
        help="how long the code works (default: the policy's default)",
    )
    install.add_argument(
        "--wait", action="store_true", help="follow the device until its first report"
    )
    install.add_argument(
        "--wait-timeout",
        type=positive_seconds,
        default=DEFAULT_WAIT_SECONDS,
        metavar="SECONDS",
        help="give up waiting after this long, exit code 3 (default %(default)g)",
    )
    install.add_argument("--no-qr", action="store_true", help="do not draw the QR code")
    install.set_defaults(func=_install)


def _register_enrollments(commands: Any) -> None:
    enrollments = commands.add_parser("enrollments", help="installers' one-time enrollments")
    sub = enrollments.add_subparsers(dest="enrollments_command", required=True, metavar="ACTION")

    listing = add_api_command(sub, "list", "list enrollments, newest first")
    listing.add_argument("--device", metavar="ID", help="only this device's enrollments")
    listing.add_argument("--state", choices=list(ENROLLMENT_STATES), help="only in this state")
    listing.add_argument("--all", action="store_true", help="fetch every page")
    listing.set_defaults(func=_enrollments_list)

    for action, help_text, func in (
        ("get", "show one enrollment", _enrollments_get),
        ("cancel", "cancel a pending enrollment: its code stops working", _enrollments_cancel),
    ):
        command = add_api_command(sub, action, help_text)
        command.add_argument("enrollment", metavar="ID", help="enrollment id or enrollments/ID")
        command.set_defaults(func=func)


def _register_groups(commands: Any) -> None:
    groups = commands.add_parser(
        "groups", help="manufacturers' CAs trusted for zero-touch enrollment"
    )
    sub = groups.add_subparsers(dest="groups_command", required=True, metavar="ACTION")

    create = add_api_command(sub, "create", "trust a manufacturer's CA")
    create.add_argument("group", metavar="ID", help="1-63 lower-case letters, digits, '-'")
    create.add_argument("--ca-cert", required=True, metavar="FILE", help="the CA certificate, PEM")
    create.add_argument("--description", default="", metavar="TEXT", help="e.g. the maker")
    create.set_defaults(func=_groups_create)

    listing = add_api_command(sub, "list", "list enrollment groups")
    listing.set_defaults(func=_groups_list)

    for action, help_text, func in (
        ("get", "show one enrollment group", _groups_get),
        ("delete", "stop trusting a manufacturer's CA", _groups_delete),
    ):
        command = add_api_command(sub, action, help_text)
        command.add_argument("group", metavar="ID", help="group id or enrollmentGroups/ID")
        command.set_defaults(func=func)


def _register_certs(commands: Any) -> None:
    certs = commands.add_parser("certs", help="device certificates and the provisioning policy")
    sub = certs.add_subparsers(dest="certs_command", required=True, metavar="ACTION")

    listing = add_api_command(sub, "list", "list issued certificates, newest first")
    listing.add_argument("--device", metavar="ID", help="only this device's certificates")
    listing.add_argument("--all", action="store_true", help="fetch every page")
    listing.set_defaults(func=_certs_list)

    show = add_api_command(sub, "show", "show one certificate")
    show.add_argument("serial", metavar="SERIAL", help="serial number (hex) or certificates/SERIAL")
    show.add_argument("--pem", action="store_true", help="print just the certificate, PEM")
    show.set_defaults(func=_certs_show)

    revoke = add_api_command(sub, "revoke", "revoke a certificate: the device must enroll again")
    revoke.add_argument(
        "serial", metavar="SERIAL", help="serial number (hex) or certificates/SERIAL"
    )
    revoke.add_argument("--reason", required=True, metavar="TEXT", help="why, for the audit log")
    revoke.set_defaults(func=_certs_revoke)

    policy = add_api_command(sub, "policy", "show the provisioning policy, or change it")
    for option, field, metavar, help_text in POLICY_OPTIONS:
        policy.add_argument(option, dest=field, type=int, metavar=metavar, help=help_text)
    policy.set_defaults(func=_certs_policy)


def _register_audit(commands: Any) -> None:
    audit = add_api_command(commands, "audit", "the provisioning audit log, newest first")
    audit.add_argument("--device", metavar="ID", help="only events about this device")
    audit.add_argument(
        "--limit", type=positive_int, default=50, metavar="N", help="at most N events (50)"
    )
    audit.set_defaults(func=_audit)


def register(commands: Any) -> None:
    """Add `install`, `enrollments list|get|cancel`, `groups create|list|get|delete`,
    `certs list|show|revoke|policy` and `audit`."""
    _register_install(commands)
    _register_enrollments(commands)
    _register_groups(commands)
    _register_certs(commands)
    _register_audit(commands)
