"""Energy used per day, from the cumulative meter readings (`energy.total_wh`) lamps send as
telemetry, summed per label value (e.g. per district). Pure functions over plain data.

A day's energy for one device is the sum of the increases between its consecutive readings,
each increase counted on the local day of the later reading. A reading lower than the one
before it means the meter was reset or replaced: that step counts nothing, the next one
counts from the new value. Readings spaced over midnight attribute the whole step to the day
it ends in; with readings every few minutes that error is small and it never double-counts.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import date, datetime
from itertools import pairwise
from zoneinfo import ZoneInfo

METER = "energy.total_wh"


@dataclass(frozen=True)
class Reading:
    """One meter reading of one device."""

    device_id: str
    at: datetime
    total_wh: float


@dataclass(frozen=True)
class DailyEnergy:
    """Energy of a group of devices on one local day."""

    group: str
    day: date
    energy_wh: float
    devices: int


def energy_per_device_day(
    readings: Iterable[Reading], tz: ZoneInfo
) -> dict[tuple[str, date], float]:
    """Wh used by each device on each local day that one of its steps ends in."""
    by_device: dict[str, list[Reading]] = defaultdict(list)
    for reading in readings:
        by_device[reading.device_id].append(reading)
    used: dict[tuple[str, date], float] = defaultdict(float)
    for device_id, series in by_device.items():
        series.sort(key=lambda r: r.at)
        for before, after in pairwise(series):
            step = after.total_wh - before.total_wh
            if step > 0:
                used[(device_id, after.at.astimezone(tz).date())] += step
    return dict(used)


def energy_by_group(
    per_device_day: Mapping[tuple[str, date], float],
    groups: Mapping[str, str],
    first: date,
    last: date,
) -> list[DailyEnergy]:
    """Sum per (group, day) for days in [first, last]; `groups` maps device id to its group
    (a label's value; devices without the label are in the group ""). Sorted by group, day."""
    totals: dict[tuple[str, date], float] = defaultdict(float)
    members: dict[tuple[str, date], set[str]] = defaultdict(set)
    for (device_id, day), wh in per_device_day.items():
        if first <= day <= last:
            key = (groups.get(device_id, ""), day)
            totals[key] += wh
            members[key].add(device_id)
    return [
        DailyEnergy(
            group=group,
            day=day,
            energy_wh=round(totals[(group, day)], 3),
            devices=len(members[(group, day)]),
        )
        for group, day in sorted(totals)
    ]
