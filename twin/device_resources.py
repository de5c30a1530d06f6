"""The device-facing twin API on CoAP. A device, authenticated by its certificate on
`coaps+tcp`, reads and observes its own twin and reports its state; it can name no other
device (its principal is scoped to itself).

* `GET /twin`: the whole twin (desired, reported, delta, version).
* `POST`/`PATCH /twin/reported`: a JSON Merge Patch of the reported state, CBOR or JSON,
  validated against the profile and answered 2.04 only once committed.
* `GET /twin/desired`, `GET /twin/delta`: observable (RFC 7641); a change reaches observers at
  once through the change feed (see device_observers.py). Each answer carries an ETag, so a
  device waking up can ask with it and get a bodiless 2.03 Valid if nothing changed. The
  desired state's ETag is its version (8 bytes, big-endian), which acknowledgements
  (`"$ack": {"version": ...}` in a report) name.
* `POST /twin/telemetry`: measurements as SenML (RFC 8428), see telemetry_store.py.
* `GET /twin/dimming-plan`: a lamp's schedule as concrete times for today and tomorrow.
* `POST /twin/heartbeat`: nothing but "I am here", for devices with nothing to report.

Every request a device makes counts as a sign of life (liveness_store.py). Writes (reports,
telemetry, heartbeats) are limited per device (write_rate_limits.py); reports queue up and
commit in groups (report_commits.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import aiocoap
import aiocoap.resource
from aiocoap.numbers import ContentFormat
from aiocoap.numbers.codes import Code
from aiocoap.pipe import Pipe

from provisioning.device_certificates import DeviceIdentity, identify_device
from twin.access import device_principal
from twin.change_feed import FeedNotifier
from twin.coap_resources import BoundedResource, negotiate_accept, require_content_format
from twin.coap_tls import peer_certificate
from twin.device_observers import DeviceObservers, Document
from twin.device_payloads import (
    CBOR,
    JSON,
    MAX_REPORT_BYTES,
    decode_patch,
    encode_document,
    etag_of,
)
from twin.dimming_schedule import parse_schedule, resolve_schedule
from twin.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from twin.grouped_calls import GroupedCalls
from twin.liveness_store import Liveness
from twin.registry import get_device
from twin.report_commits import Report, report_committer
from twin.senml import SENML_CBOR, SENML_JSON, SenmlError, decode_pack
from twin.telemetry_store import telemetry_report
from twin.twin_store import TwinView, get_twin, read_twins
from twin.write_rate_limits import WriteRateLimiter

# Twins read per query for notifications and GETs of observable documents.
_MAX_TWIN_READS = 500


@dataclass
class DeviceSide:
    """What the device resources share: the feed notifier, the observations, liveness, the
    group commit their reports queue up in, the grouped reads of observed twins (a change for
    a thousand lamps notifies a thousand observers at once), and how often a device may
    write."""

    notifier: FeedNotifier
    observers: DeviceObservers
    liveness: Liveness
    reports: GroupedCalls[Report, TwinView]
    twins: GroupedCalls[str, TwinView]
    write_limits: WriteRateLimiter

    @classmethod
    def create(
        cls,
        notifier: FeedNotifier,
        observers: DeviceObservers,
        liveness: Liveness,
        write_limits: WriteRateLimiter,
    ) -> DeviceSide:
        """The device side with its grouped calls (close() them when the CoAP side stops)."""
        twins = GroupedCalls(read_twins, max_group=_MAX_TWIN_READS, name="observed twin reads")
        return cls(notifier, observers, liveness, report_committer(notifier), twins, write_limits)

    async def close(self) -> None:
        """Wait for the reports and reads still queued."""
        await self.reports.close()
        await self.twins.close()

    async def device(
        self, request: aiocoap.Message, *, seen: bool = True, writes: bool = False
    ) -> DeviceIdentity:
        """The device whose certificate the request's connection presented; `seen` records
        it as alive (not for renders the server itself triggers); `writes` counts the
        request against the device's write rate (ResourceExhausted beyond it, before any
        database work)."""
        identity = await identify_device(peer_certificate(request))
        if writes:
            limits = self.write_limits
            wait = limits.take(identity.device_id, time.monotonic())
            if wait:
                raise ResourceExhausted(
                    f"device {identity.device_id} writes more than {limits.per_minute:g} times"
                    f" a minute (bursts of {limits.burst}); retry in {wait} s",
                    wait,
                )
        if seen:
            await self.liveness.seen(identity.device_id)
        return identity


def _answer(
    document: object, request: aiocoap.Message, content_format: int, etag: bytes | None = None
) -> aiocoap.Message:
    etag = etag or etag_of(document)
    if etag in (request.opt.etags or ()):
        response = aiocoap.Message(code=Code.VALID)
    else:
        response = aiocoap.Message(
            code=Code.CONTENT,
            payload=encode_document(document, content_format),
            content_format=ContentFormat(content_format),
        )
    response.opt.etag = etag
    return response


class OwnTwin(BoundedResource):
    """`/twin`: GET the requesting device's whole twin."""

    rt = "citytwin.twin"
    ct = f"{JSON} {CBOR}"

    def __init__(self, side: DeviceSide) -> None:
        super().__init__(max_body_bytes=0)
        self.side = side

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        """The twin of the device whose certificate the connection presented."""
        content_format = negotiate_accept(request, JSON, CBOR)
        identity = await self.side.device(request)
        twin = await get_twin(identity.device_id, device_principal(identity.device_id))
        body = {
            "device": identity.device_id,
            "version": twin.version,
            "desired_version": twin.desired_version,
            "desired": twin.desired,
            "reported": twin.reported,
            "delta": twin.delta,
        }
        return _answer(body, request, content_format)


class ReportedState(BoundedResource):
    """`/twin/reported`: POST or PATCH a merge patch of the device's reported state."""

    rt = "citytwin.twin.reported"
    ct = f"{JSON} {CBOR}"

    def __init__(self, side: DeviceSide) -> None:
        super().__init__(max_body_bytes=MAX_REPORT_BYTES)
        self.side = side

    async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
        """Apply the report; 2.04 once committed, with the twin's new version as ETag."""
        content_format = require_content_format(request, JSON, CBOR)
        patch = decode_patch(request.payload, content_format)
        identity = await self.side.device(request, writes=True)
        twin = await self.side.reports.call(
            Report(identity.device_id, patch, device_principal(identity.device_id))
        )
        response = aiocoap.Message(code=Code.CHANGED)
        response.opt.etag = twin.version.to_bytes(8, "big")
        return response

    render_patch = render_post


class _ObservedDocument(BoundedResource):
    """A view of the device's twin that devices may observe. An observation is served by
    `DeviceObservers` straight from the request's pipe (no task per observer, see
    pipe_observations.py), not by aiocoap's ObservableResource."""

    ct = f"{JSON} {CBOR}"
    document: Document
    view: Callable[[TwinView], object]

    def __init__(self, side: DeviceSide) -> None:
        super().__init__(max_body_bytes=0)
        self.side = side

    async def render_to_pipe(self, pipe: Pipe) -> None:
        """A GET with Observe: 0 from a device registers an observation; anything else is
        answered once."""
        request = pipe.request
        if request.opt.observe != 0 or request.code != Code.GET:
            await super().render_to_pipe(pipe)
            return
        try:
            # The registering request is the device's own: a sign of life.
            identity = await self.side.device(request)
        except Exception:
            # Not a device of ours: the render refuses it, and nothing is registered.
            pipe.add_response(await self.render(request), is_last=True)
            return
        await self.side.observers.observe(pipe, self, identity.device_id, self.document)

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        """The current document, or 2.03 Valid if the request's ETag still matches."""
        content_format = negotiate_accept(request, JSON, CBOR)
        # The first answer and the notifications of an observation render its registering
        # request (Observe: 0), which render_to_pipe counted as a sign of life: pushing to a
        # device is not hearing from it.
        identity = await self.side.device(request, seen=request.opt.observe != 0)
        twin = await self.side.twins.call(identity.device_id)
        return _answer(type(self).view(twin), request, content_format, self.etag(twin))

    def etag(self, twin: TwinView) -> bytes | None:
        """The ETag of this view (None: a hash of the content)."""
        return None

    def get_link_description(self) -> dict[str, Any]:
        """Discovery attributes, marked observable."""
        link: dict[str, Any] = super().get_link_description()
        link["obs"] = None
        return link


class DesiredState(_ObservedDocument):
    """`/twin/desired`: the desired state, observable."""

    rt = "citytwin.twin.desired"
    document = Document.DESIRED

    def etag(self, twin: TwinView) -> bytes | None:
        """The desired version, 8 bytes big-endian: it changes exactly when desired state
        does, and it is the version a device's `$ack` must name."""
        return twin.desired_version.to_bytes(8, "big")

    @staticmethod
    def view(twin: TwinView) -> object:
        """The desired document."""
        return twin.desired


class DeltaState(_ObservedDocument):
    """`/twin/delta`: what the device still has to do (desired leaves differing from
    reported), observable. Computed from the current documents, so a device that was offline
    gets one coalesced delta, never a stale intermediate value."""

    rt = "citytwin.twin.delta"
    document = Document.DELTA

    @staticmethod
    def view(twin: TwinView) -> object:
        """The delta document."""
        return twin.delta


class Telemetry(BoundedResource):
    """`/twin/telemetry`: POST measurements as SenML (CBOR 112 or JSON 110); each is kept as
    a sample and the latest of each lands in the reported state. 2.04 once committed."""

    rt = "citytwin.telemetry"
    ct = f"{SENML_JSON} {SENML_CBOR}"

    def __init__(self, side: DeviceSide) -> None:
        super().__init__(max_body_bytes=MAX_REPORT_BYTES)
        self.side = side

    async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
        """Decode, validate against the profile, store."""
        content_format = require_content_format(request, SENML_JSON, SENML_CBOR)
        try:
            measurements = decode_pack(request.payload, content_format, now=datetime.now(UTC))
        except SenmlError as bad:
            raise InvalidArgument(f"body is not valid SenML: {bad}") from None
        identity = await self.side.device(request, writes=True)
        twin = await self.side.reports.call(
            telemetry_report(identity.device_id, measurements, device_principal(identity.device_id))
        )
        response = aiocoap.Message(code=Code.CHANGED)
        response.opt.etag = twin.version.to_bytes(8, "big")
        return response


class DimmingPlan(BoundedResource):
    """`/twin/dimming-plan`: a lamp's desired dimming schedule resolved into concrete switching
    times for today and tomorrow (local days in the service's time zone), with sunset- and
    sunrise-relative steps computed for the lamp's location. Lamp controllers without a clock
    for the sun fetch it once a day."""

    rt = "citytwin.dimming-plan"
    ct = f"{JSON} {CBOR}"

    def __init__(self, side: DeviceSide, tz: ZoneInfo) -> None:
        super().__init__(max_body_bytes=0)
        self.side = side
        self.tz = tz

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        """`[{"at": RFC 3339, "level": 0-100}, ...]` in time order."""
        content_format = negotiate_accept(request, JSON, CBOR)
        identity = await self.side.device(request)
        principal = device_principal(identity.device_id)
        device = await get_device(identity.device_id, principal)
        twin = await get_twin(identity.device_id, principal)
        latitude, longitude = device.location.latitude, device.location.longitude
        if latitude is None or longitude is None:
            raise FailedPrecondition(
                f"device {identity.device_id} has no location; an installer must set it"
            )
        schedule = twin.desired.get("dimming_schedule")
        # Checked when it was set (twin_store.check_desired_semantics).
        entries = parse_schedule(list(schedule) if isinstance(schedule, list) else [])
        today = datetime.now(self.tz).date()
        plan = [
            {"at": moment.isoformat(), "level": level}
            for day in (today, today + timedelta(days=1))
            for moment, level in resolve_schedule(entries, latitude, longitude, day, self.tz)
        ]
        return _answer(plan, request, content_format)


class Heartbeat(BoundedResource):
    """`/twin/heartbeat`: POST (empty) to say the device is alive; 2.04."""

    rt = "citytwin.heartbeat"

    def __init__(self, side: DeviceSide) -> None:
        super().__init__(max_body_bytes=0)
        self.side = side

    async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
        """Record the device as seen."""
        await self.side.device(request, writes=True)
        return aiocoap.Message(code=Code.CHANGED)


def add_device_resources(site: aiocoap.resource.Site, side: DeviceSide, tz: ZoneInfo) -> None:
    """Add the device twin resources to the CoAP site; `tz` is the city's time zone."""
    site.add_resource(["twin"], OwnTwin(side))
    site.add_resource(["twin", "reported"], ReportedState(side))
    site.add_resource(["twin", "desired"], DesiredState(side))
    site.add_resource(["twin", "delta"], DeltaState(side))
    site.add_resource(["twin", "telemetry"], Telemetry(side))
    site.add_resource(["twin", "heartbeat"], Heartbeat(side))
    site.add_resource(["twin", "dimming-plan"], DimmingPlan(side, tz))
