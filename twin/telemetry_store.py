"""Telemetry: the measurements devices send as SenML. The latest value of each measurement
lands in the device's reported state (so selectors, deltas and the change feed see it); every
sample is also kept, for the retention period, to be read back for a time range.

A measurement is named after the profile property it measures (see senml.reported_patch),
so the profile validates telemetry exactly as it validates reports: a pack naming an unknown
property, or a value out of range, is refused whole and nothing is stored.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from tortoise.expressions import Q

from twin.access import Principal
from twin.energy import METER, DailyEnergy, Reading, energy_by_group, energy_per_device_day
from twin.errors import InvalidArgument
from twin.merge_patch import Document
from twin.metadata import format_timestamp
from twin.models import TelemetrySample
from twin.page_tokens import decode_numeric_page_token, page_size, split_page
from twin.registry import get_device, scan_devices
from twin.report_commits import Report
from twin.selectors import Selector
from twin.senml import Measurement, SenmlError, latest_values, reported_patch

_MAX_TEXT = 256


@dataclass(frozen=True)
class Sample:
    """One stored measurement."""

    id: int
    name: str
    at: datetime
    value: float | str | bool | None
    unit: str


def _row(device_id: str, measurement: Measurement) -> TelemetrySample:
    value = measurement.value if measurement.value is not None else measurement.sum
    return TelemetrySample(
        device_id=device_id,
        name=measurement.name,
        at=measurement.time,
        number=value if isinstance(value, int | float) and not isinstance(value, bool) else None,
        text=value if isinstance(value, str) else None,
        flag=value if isinstance(value, bool) else None,
        unit=(measurement.unit or "")[:32],
    )


def telemetry_report(
    device_id: str, measurements: Sequence[Measurement], principal: Principal
) -> Report:
    """The report a SenML pack makes: each measurement's latest value into the reported
    state, stamped with the time it was measured (so that a pack arriving after a newer one
    leaves the newer values be), and every sample kept."""
    try:
        latest = latest_values(measurements)
        patch = reported_patch(latest)
    except SenmlError as bad:
        raise InvalidArgument(str(bad)) from None
    for measurement in measurements:
        if isinstance(measurement.value, str) and len(measurement.value) > _MAX_TEXT:
            raise InvalidArgument(
                f"measurement {measurement.name!r}: string values are at most {_MAX_TEXT} chars"
            )
    return Report(
        device_id,
        patch,
        principal,
        samples=[_row(device_id, m) for m in measurements],
        measured_at=_measured_at(latest),
    )


def _measured_at(latest: Mapping[str, Measurement]) -> Document:
    # Mirrors reported_patch's nesting, which has checked the names already.
    times: Document = {}
    for name, measurement in latest.items():
        *parents, leaf = name.split(".")
        node = times
        for part in parents:
            child = node.setdefault(part, {})
            assert isinstance(child, dict)
            node = child
        node[leaf] = format_timestamp(measurement.time)
    return times


async def read_telemetry(
    device_id: str,
    name: str,
    start: datetime | None,
    end: datetime | None,
    requested_size: int,
    token: str,
    principal: Principal,
) -> tuple[list[Sample], str]:
    """A page of a device's samples in time order, optionally of one measurement, within
    [start, end)."""
    await get_device(device_id, principal)  # existence and scope
    if start is not None and end is not None and end <= start:
        raise InvalidArgument("end_time must be after start_time")
    size = page_size(requested_size)
    filter_text = f"{device_id}|{name}|{start}|{end}"
    after = decode_numeric_page_token(token, filter_text)
    query = TelemetrySample.filter(device_id=device_id)
    if name:
        query = query.filter(name=name)
    if start is not None:
        query = query.filter(at__gte=start)
    if end is not None:
        query = query.filter(at__lt=end)
    if after is not None:
        # Keyset on (at, id): resume after the last sample of the previous page.
        last = await TelemetrySample.filter(id=after).first()
        if last is None:
            raise InvalidArgument("page_token refers to a sample that is gone")
        query = query.filter(Q(at__gt=last.at) | Q(at=last.at, id__gt=after))
    rows, next_token = split_page(
        await query.order_by("at", "id").limit(size + 1), size, lambda r: str(r.id), filter_text
    )
    page = [
        Sample(
            id=r.id,
            name=r.name,
            at=r.at,
            value=r.number if r.number is not None else (r.text if r.text is not None else r.flag),
            unit=r.unit,
        )
        for r in rows
    ]
    return page, next_token


async def trim_telemetry(retention: timedelta) -> int:
    """Delete samples older than the retention period; returns how many."""
    deleted: int = await TelemetrySample.filter(at__lt=datetime.now(UTC) - retention).delete()
    return deleted


_MAX_DAYS = 366
_ID_CHUNK = 500


async def summarize_energy(
    selector: Selector,
    label_key: str,
    first: date,
    last: date,
    tz: ZoneInfo,
    principal: Principal,
) -> list[DailyEnergy]:
    """Energy per day and label value for the devices `selector` matches (see energy.py)."""
    if selector.uses_twin_values:
        raise InvalidArgument("energy filters may only use device attributes and labels")
    if not label_key:
        raise InvalidArgument("group_by_label is required, e.g. district")
    if last < first or (last - first).days >= _MAX_DAYS:
        raise InvalidArgument(f"end_date must be on or after start_date, at most {_MAX_DAYS} days")
    groups = {
        view.id: view.labels.get(label_key, "")
        async for view, _ in scan_devices(selector.combine(principal.scope))
    }
    # One day of margin before the first: the step into the first day needs the reading
    # before it.
    start = datetime.combine(first - timedelta(days=1), time(), tz)
    end = datetime.combine(last + timedelta(days=1), time(), tz)
    ids = list(groups)
    readings: list[Reading] = []
    for i in range(0, len(ids), _ID_CHUNK):
        rows = await TelemetrySample.filter(
            device_id__in=ids[i : i + _ID_CHUNK],
            name=METER,
            at__gte=start,
            at__lt=end,
            number__isnull=False,
        ).values_list("device_id", "at", "number")
        readings.extend(Reading(str(d), at, float(n)) for d, at, n in rows)
    return energy_by_group(energy_per_device_day(readings, tz), groups, first, last)
