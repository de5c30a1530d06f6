"""Dimming schedules: parsing from the desired state, resolving a local day, the level in force."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, time, timedelta, timezone, tzinfo
from itertools import pairwise
from zoneinfo import ZoneInfo

import pytest

from twin.builtin_profiles import builtin_profile
from twin.dimming_schedule import (
    ClockEntry,
    ScheduleEntry,
    SolarEntry,
    level_at,
    parse_schedule,
    resolve_schedule,
)
from twin.profiles import validate_patch
from twin.solar import sun_times

TOLERANCE = timedelta(minutes=2)
AMSTERDAM = (52.37, 4.89, ZoneInfo("Europe/Amsterdam"))
TROMSO = (69.65, 18.96, ZoneInfo("Europe/Oslo"))

# A typical street-lamp night: full 15 min before sunset, dimmed late at night, raised for the
# morning commute, off 10 min after sunrise.
NIGHT: list[object] = [
    {"at": "sunset", "offset_minutes": -15, "level": 100},
    {"at": "23:00", "level": 40},
    {"at": "05:00", "level": 70},
    {"at": "sunrise", "offset_minutes": 10, "level": 0},
]


def _local(tz: tzinfo, day: date, hh_mm_ss: str) -> datetime:
    return datetime.combine(day, time.fromisoformat(hh_mm_ss), tzinfo=tz)


def _assert_times(
    got: list[tuple[datetime, int]], want: list[tuple[datetime, int]], tz: tzinfo
) -> None:
    assert [level for _, level in got] == [level for _, level in want], got
    for (g, _), (w, _) in zip(got, want, strict=True):
        assert g.tzinfo is tz
        assert abs(g - w) <= TOLERANCE, (g, w)


# --- parse_schedule --------------------------------------------------------------------------


def test_parse_all_forms() -> None:
    entries = parse_schedule(
        [
            {"at": "22:30", "level": 40},
            {"at": "sunset", "offset_minutes": -15, "level": 100},
            {"at": "sunrise", "offset_minutes": 10, "level": 0},
            {"at": "dusk", "level": 80},
            {"at": "dawn", "offset_minutes": 0, "level": 60},
            {"at": "00:00", "level": 0},
            {"at": "23:59", "level": 100.0},
            # The form the built-in lamp profile describes.
            {"at": "sunset-00:15", "level": 100},
            {"at": "sunrise+12:00", "level": 5},
            {"at": "dusk", "offset_minutes": -720.0, "level": 1},
        ]
    )
    assert entries == [
        ClockEntry(time(22, 30), 40),
        SolarEntry("sunset", -15, 100),
        SolarEntry("sunrise", 10, 0),
        SolarEntry("dusk", 0, 80),
        SolarEntry("dawn", 0, 60),
        ClockEntry(time(0, 0), 0),
        ClockEntry(time(23, 59), 100),
        SolarEntry("sunset", -15, 100),
        SolarEntry("sunrise", 720, 5),
        SolarEntry("dusk", -720, 1),
    ]
    assert all(isinstance(e.level, int) for e in entries)
    assert parse_schedule([]) == []


_OFFSET_RULE = "must be an integer -720..720"
_LEVEL_RULE = "must be an integer 0..100"
_AT_RULE = 'must be "HH:MM"'


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"at": "sunset", "offset_minutes": 721, "level": 100}, f".offset_minutes: {_OFFSET_RULE}"),
        ({"at": "sunset", "offset_minutes": -721, "level": 1}, f".offset_minutes: {_OFFSET_RULE}"),
        ({"at": "dusk", "offset_minutes": 1.5, "level": 1}, f".offset_minutes: {_OFFSET_RULE}"),
        ({"at": "dusk", "offset_minutes": True, "level": 1}, f".offset_minutes: {_OFFSET_RULE}"),
        ({"at": "dusk", "offset_minutes": "10", "level": 1}, f".offset_minutes: {_OFFSET_RULE}"),
        ({"at": "dusk", "offset_minutes": None, "level": 1}, f".offset_minutes: {_OFFSET_RULE}"),
        ({"at": "22:00", "offset_minutes": 5, "level": 1}, ".offset_minutes: only allowed with"),
        (
            {"at": "sunset+00:10", "offset_minutes": 5, "level": 1},
            ".offset_minutes: not allowed when `at` has an offset",
        ),
        ({"at": "22:00", "level": 101}, f".level: {_LEVEL_RULE}"),
        ({"at": "22:00", "level": -1}, f".level: {_LEVEL_RULE}"),
        ({"at": "22:00", "level": 50.5}, f".level: {_LEVEL_RULE}"),
        ({"at": "22:00", "level": True}, f".level: {_LEVEL_RULE}"),
        ({"at": "22:00", "level": "50"}, f".level: {_LEVEL_RULE}"),
        ({"at": "22:00", "level": None}, f".level: {_LEVEL_RULE}"),
        ({"at": "22:00"}, ".level: is required"),
        ({"at": "sunrise"}, ".level: is required"),
        ({"level": 10}, ".at: is required"),
        ({"at": "24:00", "level": 1}, f".at: {_AT_RULE}"),
        ({"at": "22:60", "level": 1}, f".at: {_AT_RULE}"),
        ({"at": "7:30", "level": 1}, f".at: {_AT_RULE}"),
        ({"at": "07:30:00", "level": 1}, f".at: {_AT_RULE}"),
        ({"at": " 07:30", "level": 1}, f".at: {_AT_RULE}"),
        ({"at": "٠٧:٣٠", "level": 1}, f".at: {_AT_RULE}"),  # Arabic-Indic digits
        ({"at": "Sunset", "level": 1}, f".at: {_AT_RULE}"),
        ({"at": "noon", "level": 1}, f".at: {_AT_RULE}"),
        ({"at": "sunset+1:00", "level": 1}, f".at: {_AT_RULE}"),
        ({"at": "sunset+00:60", "level": 1}, f".at: {_AT_RULE}"),
        ({"at": "sunset 00:10", "level": 1}, f".at: {_AT_RULE}"),
        ({"at": 2230, "level": 1}, f".at: {_AT_RULE}"),
        ({"at": "sunset+12:01", "level": 1}, ".at: the offset must be within 12:00"),
        ({"at": "22:00", "level": 1, "days": "mon-fri"}, ".days: unknown key"),
    ],
)
def test_parse_errors_name_the_path(entry: dict[str, object], message: str) -> None:
    good = {"at": "22:00", "level": 40}
    with pytest.raises(ValueError, match="^" + re.escape("dimming_schedule[2]" + message)):
        parse_schedule([good, good, entry])


def test_parse_error_example_from_the_spec() -> None:
    entries: list[object] = [
        {"at": "22:30", "level": 40},
        {"at": "sunset", "offset_minutes": -15, "level": 100},
        {"at": "sunrise", "offset_minutes": 900, "level": 0},
    ]
    with pytest.raises(ValueError) as caught:
        parse_schedule(entries)
    assert str(caught.value) == "dimming_schedule[2].offset_minutes: must be an integer -720..720"


def test_parse_shape_errors_and_path_prefix() -> None:
    with pytest.raises(ValueError, match=r"^dimming_schedule: must be a list$"):
        parse_schedule({"at": "22:00", "level": 1})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^dimming_schedule\[0\]: must be an object$"):
        parse_schedule(["22:00"])
    with pytest.raises(ValueError, match=r"^desired\.dimming_schedule\[1\]\.level: "):
        parse_schedule([{"at": "22:00", "level": 1}, {"at": "23:00"}], "desired.dimming_schedule")


# --- resolve_schedule ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("day", "sunrise", "sunset"),
    [
        # Local times of the reference sunrise/sunset (see test_solar): CEST in June, CET in
        # December.
        (date(2025, 6, 21), "05:18:05", "22:06:29"),
        (date(2025, 12, 21), "08:48:18", "16:28:55"),
    ],
)
def test_amsterdam_night(day: date, sunrise: str, sunset: str) -> None:
    lat, lon, tz = AMSTERDAM
    resolved = resolve_schedule(parse_schedule(NIGHT), lat, lon, day, tz)
    _assert_times(
        resolved,
        [
            (_local(tz, day, "05:00"), 70),
            (_local(tz, day, sunrise) + timedelta(minutes=10), 0),
            (_local(tz, day, sunset) - timedelta(minutes=15), 100),
            (_local(tz, day, "23:00"), 40),
        ],
        tz,
    )


def test_civil_twilight_entries() -> None:
    lat, lon, tz = AMSTERDAM
    day = date(2025, 6, 21)
    entries = parse_schedule([{"at": "dusk", "level": 100}, {"at": "dawn+00:05", "level": 0}])
    _assert_times(
        resolve_schedule(entries, lat, lon, day, tz),
        [(_local(tz, day, "04:33:14"), 0), (_local(tz, day, "22:56:19"), 100)],
        tz,
    )


@pytest.mark.parametrize(
    ("lat", "lon", "zone", "day", "sunrise", "sunset"),
    [
        # Southern summer, daylight saving (AEDT, UTC+11): the local day is mostly the
        # previous UTC day.
        (-33.87, 151.21, "Australia/Sydney", date(2025, 12, 21), "05:40:45", "20:05:31"),
        # Near the date line. Kiritimati keeps UTC+14 at 157° W, a whole day ahead of its solar
        # time, so its local day takes its events from the previous solar day.
        (1.87, -157.40, "Pacific/Kiritimati", date(2025, 7, 1), "06:26:34", "18:40:17"),
        (-13.83, -171.76, "Pacific/Apia", date(2025, 7, 1), "06:51:14", "18:10:34"),
        (-18.14, 178.44, "Pacific/Fiji", date(2025, 7, 1), "06:38:22", "17:41:51"),
    ],
)
def test_events_fall_on_the_local_day(
    lat: float, lon: float, zone: str, day: date, sunrise: str, sunset: str
) -> None:
    tz = ZoneInfo(zone)
    entries = parse_schedule([{"at": "sunset", "level": 100}, {"at": "sunrise", "level": 0}])
    _assert_times(
        resolve_schedule(entries, lat, lon, day, tz),
        [(_local(tz, day, sunrise), 0), (_local(tz, day, sunset), 100)],
        tz,
    )


def test_offsets_carry_an_entry_into_the_next_local_day() -> None:
    """Each firing lands on exactly one local day: the one its instant falls on."""
    lat, lon, tz = AMSTERDAM
    entries = parse_schedule([{"at": "sunset+06:00", "level": 30}])
    first = date(2025, 6, 20)
    firings: list[datetime] = []
    for n in range(4):
        day = first + timedelta(days=n)
        resolved = resolve_schedule(entries, lat, lon, day, tz)
        assert len(resolved) == 1
        moment, level = resolved[0]
        assert (moment.date(), level) == (day, 30)
        # After a 22:06 sunset, +6 h is 04:06 the next local day: the previous solar day's.
        sunset = sun_times(lat, lon, day - timedelta(days=1)).sunset
        assert sunset is not None
        assert moment == sunset + timedelta(hours=6)
        firings.append(moment)
    gaps = [b - a for a, b in pairwise(firings)]
    assert all(abs(gap - timedelta(days=1)) < timedelta(minutes=2) for gap in gaps)


@pytest.mark.parametrize(
    ("lat", "lon", "tz"),
    [
        # Local time a day ahead of solar time, and a day behind it.
        (1.87, -157.40, ZoneInfo("Pacific/Kiritimati")),
        (-16.0, 179.0, timezone(timedelta(hours=-12))),
        (52.37, 4.89, ZoneInfo("Europe/Amsterdam")),
    ],
)
def test_extreme_offsets_fire_once_a_day(lat: float, lon: float, tz: tzinfo) -> None:
    entries = parse_schedule(
        [
            {"at": "sunset+12:00", "level": 1},
            {"at": "sunset-12:00", "level": 2},
            {"at": "sunrise+12:00", "level": 3},
            {"at": "sunrise-12:00", "level": 4},
        ]
    )
    first = date(2025, 3, 1)
    for n in range(5):
        day = first + timedelta(days=n)
        resolved = resolve_schedule(entries, lat, lon, day, tz)
        assert sorted(level for _, level in resolved) == [1, 2, 3, 4], day
        assert all(moment.astimezone(tz).date() == day for moment, _ in resolved)


def test_sunset_after_local_midnight() -> None:
    """Reykjavik's midsummer sunset is just after midnight: the day holds yesterday's."""
    lat, lon, tz = 64.15, -21.94, ZoneInfo("Atlantic/Reykjavik")
    day = date(2025, 6, 21)
    entries = parse_schedule([{"at": "sunset", "level": 100}, {"at": "sunrise", "level": 0}])
    _assert_times(
        resolve_schedule(entries, lat, lon, day, tz),
        [(_local(tz, day, "00:03:54"), 100), (_local(tz, day, "02:55:07"), 0)],
        tz,
    )


def test_daylight_saving_changes() -> None:
    lat, lon, tz = AMSTERDAM
    entries = parse_schedule(
        [{"at": "02:30", "level": 40}, {"at": "sunrise", "level": 0}, {"at": "23:59", "level": 7}]
    )
    # Spring forward, 02:00 -> 03:00: 02:30 does not exist and moves on by the gap.
    spring = date(2025, 3, 30)
    resolved = resolve_schedule(entries, lat, lon, spring, tz)
    assert resolved[0] == (datetime(2025, 3, 30, 3, 30, tzinfo=tz), 40)
    assert resolved[0][0].utcoffset() == timedelta(hours=2)
    assert abs(resolved[1][0] - _local(tz, spring, "07:19:17")) <= TOLERANCE
    # Fall back, 03:00 -> 02:00: 02:30 happens twice and means the first, still in CEST.
    autumn = date(2025, 10, 26)
    resolved = resolve_schedule(entries, lat, lon, autumn, tz)
    # (Compared in UTC: Python never finds a time in a fold equal to one in another zone.)
    assert resolved[0][0].astimezone(UTC) == datetime(2025, 10, 26, 0, 30, tzinfo=UTC)
    assert resolved[0][0].utcoffset() == timedelta(hours=2)
    assert resolved[2][0].utcoffset() == timedelta(hours=1)
    assert [level for _, level in resolved] == [40, 0, 7]


def test_entries_at_the_same_instant_keep_list_order() -> None:
    lat, lon, tz = AMSTERDAM
    day = date(2025, 6, 21)
    entries = parse_schedule([{"at": "22:00", "level": 10}, {"at": "22:00", "level": 20}])
    resolved = resolve_schedule(entries, lat, lon, day, tz)
    assert [level for _, level in resolved] == [10, 20]
    assert level_at(resolved, _local(tz, day, "22:00")) == 20


def test_wall_times_only_and_empty_schedules() -> None:
    lat, lon, tz = AMSTERDAM
    day = date(2025, 1, 1)
    assert resolve_schedule([], lat, lon, day, tz) == []
    entries: list[ScheduleEntry] = [ClockEntry(time(18), 100), ClockEntry(time(6), 0)]
    assert resolve_schedule(entries, lat, lon, day, tz) == [
        (datetime(2025, 1, 1, 6, tzinfo=tz), 0),
        (datetime(2025, 1, 1, 18, tzinfo=tz), 100),
    ]
    # A fixed-offset zone will do as well as a ZoneInfo.
    utc = resolve_schedule(entries, lat, lon, day, UTC)
    assert utc[0] == (datetime(2025, 1, 1, 6, tzinfo=UTC), 0)


# --- polar fallback --------------------------------------------------------------------------


def _solar_noon(lat: float, lon: float, day: date) -> datetime:
    return sun_times(lat, lon, day).solar_noon


def test_polar_day_fires_morning_entries_at_solar_midnight() -> None:
    lat, lon, tz = TROMSO
    day = date(2025, 6, 21)
    entries = parse_schedule([*NIGHT, {"at": "dusk", "level": 90}, {"at": "dawn", "level": 60}])
    resolved = resolve_schedule(entries, lat, lon, day, tz)
    midnight = _solar_noon(lat, lon, day) - timedelta(hours=12)
    # PyEphem's anti-transit that night: 00:45:54 CEST.
    assert abs(midnight - _local(tz, day, "00:45:54")) < timedelta(minutes=1)
    # Sunset and dusk are skipped; dawn then sunrise (+10 ignored) fire at solar midnight, in
    # the order of an ordinary morning, so the lamp ends up off.
    assert resolved == [
        (midnight.astimezone(tz), 60),
        (midnight.astimezone(tz), 0),
        (datetime(2025, 6, 21, 5, tzinfo=tz), 70),
        (datetime(2025, 6, 21, 23, tzinfo=tz), 40),
    ]
    assert level_at(resolved, _local(tz, day, "03:00")) == 0


def test_polar_night_fires_evening_entries_at_solar_noon() -> None:
    lat, lon, tz = TROMSO
    day = date(2025, 12, 21)
    entries = parse_schedule([*NIGHT, {"at": "dusk", "level": 90}, {"at": "dawn", "level": 60}])
    resolved = resolve_schedule(entries, lat, lon, day, tz)
    noon = _solar_noon(lat, lon, day)
    assert abs(noon - _local(tz, day, "11:42:19")) < timedelta(minutes=1)  # PyEphem transit
    # Sunrise is skipped and sunset (-15 ignored) fires at solar noon; civil twilight still
    # happens around noon, so dawn and dusk stay at their real times.
    _assert_times(
        resolved,
        [
            (_local(tz, day, "05:00"), 70),
            (_local(tz, day, "09:31:24"), 60),
            (noon.astimezone(tz), 100),
            (_local(tz, day, "13:53:13"), 90),
            (_local(tz, day, "23:00"), 40),
        ],
        tz,
    )
    assert resolved[2][0] == noon


def test_white_nights_pin_dawn_and_skip_dusk() -> None:
    lat, lon, tz = 64.15, -21.94, ZoneInfo("Atlantic/Reykjavik")
    day = date(2025, 6, 21)
    entries = parse_schedule([{"at": "dusk", "level": 100}, {"at": "dawn", "level": 0}])
    resolved = resolve_schedule(entries, lat, lon, day, tz)
    midnight = _solar_noon(lat, lon, day) - timedelta(hours=12)
    assert abs(midnight - _local(tz, day, "01:29:31")) < timedelta(minutes=1)
    assert resolved == [(midnight.astimezone(tz), 0)]


def test_pinned_entries_apply_in_event_order_not_list_order() -> None:
    lat, lon = 71.29, -156.79  # Utqiaġvik, Alaska: solar midnight is at about 02:29 AKDT
    tz = ZoneInfo("America/Anchorage")
    entries = parse_schedule(
        [
            {"at": "sunrise", "offset_minutes": 10, "level": 0},
            {"at": "dawn", "level": 60},
            {"at": "sunrise", "offset_minutes": -10, "level": 30},
            {"at": "sunset", "level": 100},
            {"at": "dusk", "level": 80},
        ]
    )
    summer = resolve_schedule(entries, lat, lon, date(2025, 6, 21), tz)
    assert [level for _, level in summer] == [60, 30, 0]
    assert len({moment for moment, _ in summer}) == 1
    assert summer[0][0].astimezone(tz).hour == 2
    # Longyearbyen's midwinter sun stays below -6° too, so dusk is pinned along with sunset.
    lat, lon, tz = 78.22, 15.65, ZoneInfo("Arctic/Longyearbyen")
    winter = resolve_schedule(list(reversed(entries)), lat, lon, date(2025, 12, 21), tz)
    assert [level for _, level in winter] == [100, 80]
    noon = _solar_noon(lat, lon, date(2025, 12, 21))
    assert [moment for moment, _ in winter] == [noon, noon]


def test_pinned_moment_on_another_local_day_moves_to_the_start_of_the_day() -> None:
    lat, lon, _ = TROMSO
    # At UTC-3 Tromsø's solar midnight before 21 June is 19:45 on the 20th.
    tz = timezone(timedelta(hours=-3))
    day = date(2025, 6, 21)
    entries = parse_schedule([{"at": "sunrise", "level": 0}])
    assert resolve_schedule(entries, lat, lon, day, tz) == [(datetime(2025, 6, 21, tzinfo=tz), 0)]


@pytest.mark.parametrize(
    ("first", "last", "clock", "level"),
    [
        # Into and out of the midnight sun: off at noon throughout.
        (date(2025, 5, 10), date(2025, 5, 25), "12:00", 0),
        (date(2025, 7, 20), date(2025, 8, 1), "12:00", 0),
        # Into and out of the polar night: full in the afternoon throughout.
        (date(2025, 11, 20), date(2025, 12, 3), "14:00", 100),
        (date(2026, 1, 8), date(2026, 1, 20), "14:00", 100),
        # The late-night dimming step holds on ordinary and polar nights alike.
        (date(2025, 11, 20), date(2025, 12, 3), "23:30", 40),
    ],
)
def test_levels_continue_across_polar_transitions(
    first: date, last: date, clock: str, level: int
) -> None:
    lat, lon, tz = TROMSO
    # NIGHT without its 05:00 step, which would light the lamp on any summer morning.
    entries = parse_schedule([e for e in NIGHT if e != {"at": "05:00", "level": 70}])
    previous = resolve_schedule(entries, lat, lon, first - timedelta(days=1), tz)
    day = first
    while day <= last:
        resolved = resolve_schedule(entries, lat, lon, day, tz)
        assert level_at(resolved, _local(tz, day, clock), previous) == level, day
        previous, day = resolved, day + timedelta(days=1)


def test_polar_night_keeps_the_late_dimming_past_midnight() -> None:
    """No jump back to full at midnight: the 23:00 step carries over into the polar night."""
    lat, lon, tz = TROMSO
    entries = parse_schedule(NIGHT)
    day = date(2025, 12, 21)
    before = resolve_schedule(entries, lat, lon, day - timedelta(days=1), tz)
    resolved = resolve_schedule(entries, lat, lon, day, tz)
    assert level_at(resolved, _local(tz, day, "01:00"), before) == 40
    assert level_at(resolved, _local(tz, day, "08:00"), before) == 70


def test_resolve_rejects_bad_arguments() -> None:
    tz = ZoneInfo("Europe/Amsterdam")
    entries = parse_schedule(NIGHT)
    with pytest.raises(ValueError, match=r"^latitude: "):
        resolve_schedule(entries, 91.0, 0.0, date(2025, 1, 1), tz)
    with pytest.raises(ValueError, match=r"^longitude: "):
        resolve_schedule(entries, 0.0, -200.0, date(2025, 1, 1), tz)
    with pytest.raises(ValueError, match=r"^day: "):
        resolve_schedule(entries, 0.0, 0.0, datetime(2025, 1, 1, tzinfo=tz), tz)


# --- level_at --------------------------------------------------------------------------------


def test_level_at() -> None:
    tz = ZoneInfo("Europe/Amsterdam")
    yesterday = [
        (datetime(2025, 6, 20, 21, tzinfo=tz), 100),
        (datetime(2025, 6, 20, 23, tzinfo=tz), 40),
    ]
    today = [(datetime(2025, 6, 21, 5, tzinfo=tz), 0), (datetime(2025, 6, 21, 22, tzinfo=tz), 100)]
    assert level_at(today, datetime(2025, 6, 21, 4, tzinfo=tz)) is None
    assert level_at(today, datetime(2025, 6, 21, 4, tzinfo=tz), yesterday) == 40
    assert level_at(today, datetime(2025, 6, 21, 5, tzinfo=tz), yesterday) == 0
    assert level_at(today, datetime(2025, 6, 21, 21, 59, tzinfo=tz), yesterday) == 0
    assert level_at(today, datetime(2025, 6, 21, 23, tzinfo=tz)) == 100
    # Any aware moment will do, whatever its zone.
    assert level_at(today, datetime(2025, 6, 21, 3, 0, tzinfo=UTC)) == 0
    assert level_at(today, datetime(2025, 6, 21, 2, 59, tzinfo=UTC), yesterday) == 40
    # Before the previous day's entries too: nothing is in force.
    assert level_at(today, datetime(2025, 6, 20, 20, tzinfo=tz), yesterday) is None
    assert level_at([], datetime(2025, 6, 21, 12, tzinfo=tz), []) is None
    with pytest.raises(ValueError, match=r"^moment: "):
        level_at(today, datetime(2025, 6, 21, 12))


def test_the_lamp_profile_stores_both_offset_forms() -> None:
    lamp = builtin_profile("lamp-led-dimmable")
    assert lamp is not None
    schedule = [
        {"at": "sunset", "offset_minutes": -15, "level": 100},
        {"at": "23:00", "level": 40},
        {"at": "sunrise+00:10", "level": 0},
    ]
    validate_patch(lamp, {"dimming_schedule": schedule}, document="desired")
    assert len(parse_schedule(schedule)) == 3
