"""A lamp's dimming schedule: parsing it from the desired state, and resolving it for a day.

A schedule is the list under `dimming_schedule` in a lamp's desired state. Each entry sets a
level (0..100 %) from a moment on, the moment being either local wall time or a solar event
with an offset in minutes:

    {"at": "22:30", "level": 40}
    {"at": "sunset", "offset_minutes": -15, "level": 100}
    {"at": "sunrise", "offset_minutes": 10, "level": 0}
    {"at": "dusk", "level": 80}                              # civil twilight, sun at -6°

The events are "sunrise", "sunset", "dawn" and "dusk" (civil dawn and dusk). The offset may
also be written inside `at` as "sunset-00:15" or "sunrise+00:10", the form the built-in lamp
profile describes (and the only one it accepts today, as it does not declare
`offset_minutes`).

Everything here is pure; sun times come from `twin.solar`.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from typing import Literal, TypeAlias

from twin.solar import SunTimes, sun_times

__all__ = [
    "MAX_OFFSET_MINUTES",
    "ClockEntry",
    "ScheduleEntry",
    "SolarEntry",
    "SolarEvent",
    "level_at",
    "parse_schedule",
    "resolve_schedule",
]

SolarEvent: TypeAlias = Literal["dawn", "sunrise", "sunset", "dusk"]

MAX_OFFSET_MINUTES = 720
MAX_LEVEL = 100

# In the order they happen on an ordinary day.
_EVENTS: tuple[SolarEvent, ...] = ("dawn", "sunrise", "sunset", "dusk")
_MORNING: frozenset[SolarEvent] = frozenset({"sunrise", "dawn"})
_CIVIL: frozenset[SolarEvent] = frozenset({"dawn", "dusk"})
_KEYS = ("at", "level", "offset_minutes")
# Entries pinned by the polar fallback sort after ordinary ones at the same instant.
_UNPINNED = (-1, 0)
# [0-9] rather than \d, which also matches non-ASCII digits.
_CLOCK = re.compile(r"([01][0-9]|2[0-3]):([0-5][0-9])")
_SOLAR = re.compile(r"(sunrise|sunset|dawn|dusk)(?:([+-])([0-9]{2}):([0-5][0-9]))?")
_AT_RULE = (
    'must be "HH:MM" (00:00..23:59) or one of sunrise, sunset, dawn, dusk, optionally with'
    ' an offset such as "sunset-00:15"'
)
_OFFSET_RULE = f"must be an integer -{MAX_OFFSET_MINUTES}..{MAX_OFFSET_MINUTES}"
_LEVEL_RULE = f"must be an integer 0..{MAX_LEVEL}"


@dataclass(frozen=True, slots=True)
class ClockEntry:
    """Set `level` at a local wall-clock time."""

    at: time
    level: int


@dataclass(frozen=True, slots=True)
class SolarEntry:
    """Set `level` at a solar event plus `offset_minutes` (negative: before the event)."""

    event: SolarEvent
    offset_minutes: int
    level: int


ScheduleEntry: TypeAlias = ClockEntry | SolarEntry


def _integer(value: object) -> int | None:
    """`value` as an int if it is a JSON integer, else None.

    Integral floats count, as in the profile checks, since a JSON number written as 40.0 is
    the integer 40 to every other JSON reader.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _parse_entry(raw: object, where: str) -> ScheduleEntry:
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: must be an object")
    for key in raw:
        if key not in _KEYS:
            # A key we do not know may be a constraint we would silently ignore; refuse it.
            raise ValueError(f"{where}.{key}: unknown key (expected {', '.join(_KEYS)})")
    if "at" not in raw:
        raise ValueError(f"{where}.at: is required")
    if "level" not in raw:
        raise ValueError(f"{where}.level: is required")

    level = _integer(raw["level"])
    if level is None or not 0 <= level <= MAX_LEVEL:
        raise ValueError(f"{where}.level: {_LEVEL_RULE}")

    at = raw["at"]
    if not isinstance(at, str):
        raise ValueError(f"{where}.at: {_AT_RULE}")
    clock = _CLOCK.fullmatch(at)
    if clock is not None:
        if "offset_minutes" in raw:
            raise ValueError(
                f"{where}.offset_minutes: only allowed with {', '.join(_EVENTS)}, not a wall time"
            )
        return ClockEntry(time(int(clock[1]), int(clock[2])), level)

    solar = _SOLAR.fullmatch(at)
    if solar is None:
        raise ValueError(f"{where}.at: {_AT_RULE}")
    event: SolarEvent = next(e for e in _EVENTS if e == solar[1])
    if solar[2] is not None:
        if "offset_minutes" in raw:
            raise ValueError(f"{where}.offset_minutes: not allowed when `at` has an offset")
        offset = int(solar[3]) * 60 + int(solar[4])
        if offset > MAX_OFFSET_MINUTES:
            raise ValueError(f"{where}.at: the offset must be within 12:00")
        return SolarEntry(event, -offset if solar[2] == "-" else offset, level)

    offset_value = _integer(raw.get("offset_minutes", 0))
    if offset_value is None or not -MAX_OFFSET_MINUTES <= offset_value <= MAX_OFFSET_MINUTES:
        raise ValueError(f"{where}.offset_minutes: {_OFFSET_RULE}")
    return SolarEntry(event, offset_value, level)


def parse_schedule(entries: list[object], path: str = "dimming_schedule") -> list[ScheduleEntry]:
    """Check and parse a `dimming_schedule` list from a lamp's desired state.

    Raises ValueError at the first bad entry, with a path such as
    `dimming_schedule[2].offset_minutes: must be an integer -720..720`; `path` is the prefix
    (e.g. "desired.dimming_schedule"). Unknown keys are refused. Entries keep their order,
    which decides between entries that fall on the same instant (see `resolve_schedule`).
    """
    if not isinstance(entries, list):
        raise ValueError(f"{path}: must be a list")
    return [_parse_entry(raw, f"{path}[{i}]") for i, raw in enumerate(entries)]


def _wall(day: date, at: time, tz: tzinfo) -> datetime:
    """The instant `day` `at` in `tz`, normalised to a time that exists there.

    As in RFC 5545 (3.3.5): a wall time skipped by a forward clock change is read with the
    offset before the change, so it lands as much later as the gap is long (02:30 becomes
    03:30); a wall time that occurs twice means its first occurrence (fold=0).
    """
    return datetime.combine(day, at, tzinfo=tz).astimezone(UTC).astimezone(tz)


def _event(sun: SunTimes, event: SolarEvent) -> datetime | None:
    if event == "sunrise":
        return sun.sunrise
    if event == "sunset":
        return sun.sunset
    if event == "dawn":
        return sun.civil_dawn
    return sun.civil_dusk


def resolve_schedule(
    entries: Sequence[ScheduleEntry],
    latitude: float,
    longitude: float,
    day: date,
    tz: tzinfo,
) -> list[tuple[datetime, int]]:
    """The switching times of a schedule on one local day, as (aware datetime in `tz`, level).

    `day` is a calendar day in `tz` (e.g. a `zoneinfo.ZoneInfo`); every time returned lies in
    it, from its local midnight up to the next. The list is sorted by time; entries at the
    same instant keep the schedule's order, so the later entry is the one in force (but see
    the polar fallback below).

    Wall-time entries: a time skipped by a daylight-saving change moves later by the gap
    (02:30 becomes 03:30); a time that occurs twice means the first occurrence.

    Solar entries fire at the event plus the offset, and appear on the local day on which
    that instant falls, whichever solar day the event belongs to: "sunset+06:00" after a
    20:00 sunset appears at 02:00 on the next day's list. Resolving consecutive days therefore
    yields each firing exactly once. (Near the polar circles a large offset can make a
    morning entry fall before an evening one; the times are used as computed.)

    Polar days and nights: when the sun does not cross the horizon (sunrise/sunset) or the
    -6° circle (dawn/dusk) on the solar day whose noon is nearest local noon, the entries
    fire where the missing events converge as the polar period approaches, so that the
    lamp's day continues smoothly from the last ordinary day:

    * polar night, the sun stays below: sunrise and sunset close in on solar noon and meet
      there. Evening entries (sunset, dusk) fire at solar noon, their offsets ignored;
      morning entries (sunrise, dawn) are skipped. The lamp stays at its evening level all
      day, apart from wall-time steps.
    * polar day, the sun stays above: sunset and sunrise meet at solar midnight (the one
      that starts that solar day). Morning entries fire there, offsets ignored; evening
      entries are skipped, so the lamp keeps its daytime level.

    Should that moment fall on another local day (a zone far from solar time), the entry
    fires at the start of the local day instead. Entries fired together this way apply in
    the order their events keep on an ordinary day (dawn, sunrise, sunset, dusk, then by
    offset) rather than list order, so the level left in force is the one the morning (or
    evening) would end on; they apply after any other entry at the same instant.

    Raises ValueError naming `latitude` or `longitude` when out of range, or `day` when it
    is a datetime rather than a date.
    """
    if isinstance(day, datetime) or not isinstance(day, date):
        raise ValueError(f"day: must be a datetime.date, got {type(day).__name__}")
    local_noon = _wall(day, time(12), tz)
    start = _wall(day, time(0), tz)
    end = _wall(day + timedelta(days=1), time(0), tz)
    # In UTC the local day runs from 14 h before the UTC day `day` to 12 h after it. Solar
    # day day+k has its noon within UTC day day+k, its events within 12 h of noon and the
    # offsets add up to 12 h more, so only k = -2..2 can land on the local day.
    suns = [sun_times(latitude, longitude, day + timedelta(days=k)) for k in range(-2, 3)]
    reference = min(suns, key=lambda s: abs(s.solar_noon - local_noon))

    # (moment, tie-break rank, list index, level)
    found: list[tuple[datetime, tuple[int, int], int, int]] = []
    for index, entry in enumerate(entries):
        if isinstance(entry, ClockEntry):
            found.append((_wall(day, entry.at, tz), _UNPINNED, index, entry.level))
            continue
        state = reference.civil_polar if entry.event in _CIVIL else reference.polar
        if state == "normal":
            for sun in suns:
                event = _event(sun, entry.event)
                if event is None:
                    continue
                moment = event + timedelta(minutes=entry.offset_minutes)
                if start <= moment < end:
                    found.append((moment.astimezone(tz), _UNPINNED, index, entry.level))
        elif (state == "polar_day") == (entry.event in _MORNING):
            when = reference.solar_noon
            if state == "polar_day":
                when -= timedelta(hours=12)
            if not start <= when < end:
                when = start
            rank = (_EVENTS.index(entry.event), entry.offset_minutes)
            found.append((when.astimezone(tz), rank, index, entry.level))
    found.sort(key=lambda item: item[:3])
    return [(moment, level) for moment, _, _, level in found]


def level_at(
    resolved: Sequence[tuple[datetime, int]],
    moment: datetime,
    previous_day: Sequence[tuple[datetime, int]] | None = None,
) -> int | None:
    """The level in force at `moment` under a resolved schedule, or None if none is.

    That is the level of the last entry at or before `moment`. Before the day's first entry
    the level carries over from `previous_day` (the previous day's `resolve_schedule`
    result), if given; None means the schedule sets no level then. Both lists must be
    sorted, as `resolve_schedule` returns them. `moment` must be aware.
    """
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError("moment: must be an aware datetime")
    for entries in (resolved, previous_day or ()):
        index = bisect.bisect_right(entries, moment, key=lambda item: item[0])
        if index:
            return entries[index - 1][1]
    return None
