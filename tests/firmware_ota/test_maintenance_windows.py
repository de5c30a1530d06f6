"""Maintenance windows: grammar, open or closed at an instant, the next opening, DST nights."""

from __future__ import annotations

import random
from datetime import UTC, date, datetime, time, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from firmware_ota.maintenance_windows import (
    MAX_WINDOWS,
    Window,
    format_window,
    is_open,
    next_opening,
    parse_window,
    parse_windows,
)
from twin.errors import InvalidArgument

BERLIN = ZoneInfo("Europe/Berlin")
# Europe/Berlin in 2024: clocks go 02:00 -> 03:00 on 31 March and 03:00 -> 02:00 on 27 October,
# both at 01:00 UTC.
SPRING_FORWARD = date(2024, 3, 31)
FALL_BACK = date(2024, 10, 27)
FRIDAY = date(2024, 6, 7)
MINUTE = timedelta(minutes=1)
QUARTER = timedelta(minutes=15)
WEEKDAYS = frozenset(range(5))


def utc(day: date, hh_mm: str) -> datetime:
    return datetime.combine(day, time.fromisoformat(hh_mm), tzinfo=UTC)


def local(day: date, hh_mm: str, zone: ZoneInfo = BERLIN, fold: int = 0) -> datetime:
    return datetime.combine(day, time.fromisoformat(hh_mm), tzinfo=zone).replace(fold=fold)


def open_minutes(windows: list[Window], start: datetime, hours: int) -> int:
    return sum(is_open(windows, start + n * MINUTE, BERLIN) for n in range(hours * 60))


# --- grammar -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected", "canonical"),
    [
        ("22:00-06:00", Window(time(22), time(6)), "22:00-06:00"),
        ("Mon-Fri 09:00-16:00", Window(time(9), time(16), WEEKDAYS), "Mon-Fri 09:00-16:00"),
        ("Sat,Sun 00:00-24:00", Window(time(0), time(0), frozenset({5, 6})), "Sat,Sun 00:00-24:00"),
        ("fri-MON 22:00 - 06:00", Window(time(22), time(6), frozenset({4, 5, 6, 0})), None),
        ("Mon-Wed, Fri 09:30-16:45", Window(time(9, 30), time(16, 45), frozenset({0, 1, 2, 4})),
         None),
        (" Sun 23:59-00:00 ", Window(time(23, 59), time(0), frozenset({6})), "Sun 23:59-24:00"),
        ("Tue-Tue 08:00-08:00", Window(time(8), time(8), frozenset({1})), "Tue 08:00-08:00"),
        ("Mon-Sun 12:00-13:00", Window(time(12), time(13), frozenset(range(7))), None),
        ("Mon,Tue,Thu,Fri,Sat 01:00-02:00", Window(time(1), time(2), frozenset({0, 1, 3, 4, 5})),
         "Mon,Tue,Thu-Sat 01:00-02:00"),
    ],
)  # fmt: skip
def test_parse_window(text: str, expected: Window, canonical: str | None) -> None:
    window = parse_window(text)
    assert window == expected
    assert format_window(window) == (canonical or format_window(window))
    assert parse_window(format_window(window)) == window


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "must be"),
        ("22:00", "must be"),
        ("22:00-", "must be"),
        ("9:00-16:00", "must be"),
        ("Mon-Fri", "must be"),
        ("Mon-Fri09:00-16:00", "must be"),
        ("22:00-06:00 Mon", "must be"),
        ("24:00-06:00", "'24:00' is not a time 00:00..23:59"),
        ("22:00-24:01", "'24:01' is not a time 00:00..24:00"),
        ("25:00-06:00", "'25:00'"),
        ("22:60-06:00", "'22:60'"),
        ("٠٩:00-16:00", "must be"),
        ("Monday 09:00-16:00", "unknown day 'Monday'"),
        ("Mon-Tue-Wed 09:00-16:00", "unknown day 'Tue-Wed'"),
        ("Mon,,Tue 09:00-16:00", "unknown day ''"),
        ("Mon;Tue 09:00-16:00", "unknown day"),
        ("Mon " + " " * 200 + "09:00-16:00", "longer than"),
    ],
)
def test_parse_window_rejects(text: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=f"^window.*({message})"):
        parse_window(text)


def test_parse_window_quotes_the_text() -> None:
    with pytest.raises(InvalidArgument, match=r"^window 'Fri 25:00-06:00': '25:00'"):
        parse_window("Fri 25:00-06:00")


def test_parse_windows() -> None:
    assert parse_windows("") == ()
    assert parse_windows("   ") == ()
    assert parse_windows("Mon-Fri 09:00-16:00; Sat,Sun 10:00-12:00") == (
        Window(time(9), time(16), WEEKDAYS),
        Window(time(10), time(12), frozenset({5, 6})),
    )
    assert len(parse_windows(";".join(["01:00-02:00"] * MAX_WINDOWS))) == MAX_WINDOWS
    with pytest.raises(InvalidArgument, match=f"at most {MAX_WINDOWS}"):
        parse_windows(";".join(["01:00-02:00"] * (MAX_WINDOWS + 1)))
    with pytest.raises(InvalidArgument, match=r"item 2 .* is empty"):
        parse_windows("22:00-06:00;")
    with pytest.raises(InvalidArgument, match="window 'Mon 25:00-26:00'"):
        parse_windows("22:00-06:00; Mon 25:00-26:00")
    with pytest.raises(InvalidArgument, match="longer than"):
        parse_windows("01:00-02:00;" * 300)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"start": time(1, tzinfo=UTC), "end": time(2)},
        {"start": time(1), "end": time(2, 0, 30)},
        {"start": time(1), "end": time(2), "weekdays": frozenset()},
        {"start": time(1), "end": time(2), "weekdays": frozenset({7})},
        {"start": time(1), "end": time(2), "weekdays": frozenset({-1})},
    ],
)
def test_window_checks_its_parts(kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidArgument, match=r"^window"):
        Window(**kwargs)  # type: ignore[arg-type]


def test_format_round_trips() -> None:
    rng = random.Random(3)
    for _ in range(500):
        days = frozenset(d for d in range(7) if rng.random() < 0.5) or None
        window = Window(time(rng.randrange(24), rng.randrange(60)), time(rng.randrange(24)), days)
        assert parse_window(format_window(window)) == window


# --- open or closed ----------------------------------------------------------------------------


def test_no_windows_means_always_open() -> None:
    assert is_open([], utc(FRIDAY, "12:00"), BERLIN)
    assert next_opening([], utc(FRIDAY, "12:00"), BERLIN) is None


WORKDAYS = parse_windows("Mon-Fri 09:00-16:00")
NIGHTS = parse_windows("22:00-06:00")
FRIDAY_NIGHT = parse_windows("Fri 22:00-06:00")
WEEKEND = parse_windows("Sat,Sun 00:00-24:00")
SATURDAY = FRIDAY + timedelta(days=1)
SUNDAY = FRIDAY + timedelta(days=2)
MONDAY = FRIDAY + timedelta(days=3)

OPEN_CASES: list[tuple[tuple[Window, ...], datetime, bool]] = [
    (WORKDAYS, local(FRIDAY, "08:59"), False),
    (WORKDAYS, local(FRIDAY, "09:00"), True),
    (WORKDAYS, local(FRIDAY, "15:59"), True),
    (WORKDAYS, local(FRIDAY, "16:00"), False),  # the end is not included
    (WORKDAYS, local(SATURDAY, "12:00"), False),
    (NIGHTS, local(FRIDAY, "21:59"), False),
    (NIGHTS, local(FRIDAY, "22:00"), True),
    (NIGHTS, local(FRIDAY, "23:59"), True),
    (NIGHTS, local(SATURDAY, "00:00"), True),
    (NIGHTS, local(SATURDAY, "05:59"), True),
    (NIGHTS, local(SATURDAY, "06:00"), False),
    # The days are those the window opens on: Friday night runs into Saturday.
    (FRIDAY_NIGHT, local(SATURDAY, "03:00"), True),
    (FRIDAY_NIGHT, local(FRIDAY, "03:00"), False),
    (FRIDAY_NIGHT, local(FRIDAY, "22:00"), True),
    (FRIDAY_NIGHT, local(SATURDAY, "06:00"), False),
    (FRIDAY_NIGHT, local(SATURDAY, "22:30"), False),
    (WEEKEND, local(FRIDAY, "23:59"), False),
    (WEEKEND, local(SATURDAY, "00:00"), True),
    (WEEKEND, local(SUNDAY, "23:59"), True),
    (WEEKEND, local(MONDAY, "00:00"), False),
    # Any timezone-aware instant will do.
    (WORKDAYS, datetime(2024, 6, 7, 16, 30, tzinfo=timezone(timedelta(hours=9))), True),
]


@pytest.mark.parametrize(("windows", "at", "expected"), OPEN_CASES)
def test_is_open(windows: tuple[Window, ...], at: datetime, expected: bool) -> None:
    assert is_open(windows, at.astimezone(UTC), BERLIN) is expected
    assert is_open(windows, at, BERLIN) is expected


def test_any_window_opens() -> None:
    both = WORKDAYS + WEEKEND
    assert is_open(both, local(FRIDAY, "10:00"), BERLIN)
    assert is_open(both, local(SUNDAY, "03:00"), BERLIN)
    assert not is_open(both, local(FRIDAY, "20:00"), BERLIN)


def test_naive_datetimes_are_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        is_open(NIGHTS, datetime(2024, 6, 7, 12), BERLIN)
    with pytest.raises(ValueError, match="timezone-aware"):
        next_opening(NIGHTS, datetime(2024, 6, 7, 12), BERLIN)


@pytest.mark.parametrize(
    ("windows", "at", "expected"),
    [
        (WORKDAYS, local(FRIDAY, "08:00"), local(FRIDAY, "09:00")),
        (WORKDAYS, local(FRIDAY, "10:00"), local(FRIDAY, "10:00")),  # open now
        (WORKDAYS, local(FRIDAY, "16:00"), local(MONDAY, "09:00")),
        (FRIDAY_NIGHT, local(SATURDAY, "06:00"), local(FRIDAY + timedelta(days=7), "22:00")),
        (WEEKEND, local(FRIDAY, "10:00"), local(SATURDAY, "00:00")),
        (WORKDAYS + WEEKEND, local(FRIDAY, "17:00"), local(SATURDAY, "00:00")),
    ],
)
def test_next_opening(windows: tuple[Window, ...], at: datetime, expected: datetime) -> None:
    opening = next_opening(windows, at.astimezone(UTC), BERLIN)
    assert opening == expected
    assert opening is not None
    assert opening.tzinfo is UTC


# --- daylight-saving changes -------------------------------------------------------------------

EARLY = parse_windows("02:00-04:00")


def test_spring_forward_night() -> None:
    """02:00 does not exist: the window opens at 03:00 summer time and is open for one hour."""
    assert not is_open(EARLY, utc(SPRING_FORWARD, "00:59"), BERLIN)
    assert is_open(EARLY, utc(SPRING_FORWARD, "01:00"), BERLIN)  # 03:00 CEST
    assert is_open(EARLY, utc(SPRING_FORWARD, "01:59"), BERLIN)
    assert not is_open(EARLY, utc(SPRING_FORWARD, "02:00"), BERLIN)  # 04:00 CEST
    assert open_minutes(list(EARLY), utc(SPRING_FORWARD, "00:00") - timedelta(hours=1), 24) == 60
    opening = next_opening(EARLY, utc(SPRING_FORWARD, "00:00") - timedelta(hours=1), BERLIN)
    assert opening == utc(SPRING_FORWARD, "01:00")
    # The nights around it keep their two hours, in their own offsets.
    assert next_opening(EARLY, utc(SPRING_FORWARD, "02:00"), BERLIN) == utc(
        SPRING_FORWARD + timedelta(days=1), "00:00"
    )
    assert open_minutes(list(EARLY), utc(SPRING_FORWARD, "12:00"), 24) == 120


def test_fall_back_night() -> None:
    """02:00-03:00 happens twice: the window is open from 02:00 summer time to 04:00 winter
    time, three hours, through both passes of the repeated hour."""
    start = utc(FALL_BACK, "00:00")
    # Compared in UTC: instants in a repeated hour never equal one in another zone (PEP 495).
    assert start == local(FALL_BACK, "02:00", fold=0).astimezone(UTC)  # CEST
    assert not is_open(EARLY, start - MINUTE, BERLIN)
    assert is_open(EARLY, start, BERLIN)
    assert is_open(EARLY, local(FALL_BACK, "02:30", fold=1), BERLIN)  # the second pass
    assert is_open(EARLY, utc(FALL_BACK, "02:59"), BERLIN)
    assert not is_open(EARLY, utc(FALL_BACK, "03:00"), BERLIN)  # 04:00 CET
    assert open_minutes(list(EARLY), start - timedelta(hours=2), 24) == 180
    assert next_opening(EARLY, utc(FALL_BACK, "00:00") - timedelta(hours=3), BERLIN) == start
    assert next_opening(EARLY, utc(FALL_BACK, "03:00"), BERLIN) == utc(
        FALL_BACK + timedelta(days=1), "01:00"
    )


def test_a_window_ending_in_the_repeated_hour_does_not_reopen() -> None:
    """01:00-02:30 closes at the first 02:30 and stays closed in the repeated hour."""
    windows = list(parse_windows("01:00-02:30"))
    assert open_minutes(windows, utc(FALL_BACK, "22:00") - timedelta(days=1), 8) == 90
    assert not is_open(windows, local(FALL_BACK, "02:15", fold=1), BERLIN)


def test_night_windows_across_the_changes() -> None:
    """A 22:00-06:00 window keeps its wall-clock hours: 7 hours on the spring-forward night,
    9 on the fall-back night."""
    assert open_minutes(list(NIGHTS), utc(SPRING_FORWARD, "12:00") - timedelta(days=1), 24) == 420
    assert open_minutes(list(NIGHTS), utc(FALL_BACK, "12:00") - timedelta(days=1), 24) == 540


def test_a_window_inside_the_gap() -> None:
    """Nothing of 02:30-03:00 exists on the spring-forward night; 02:15-02:45 moves an hour
    later, as a skipped time does."""
    inside = parse_windows("Sun 02:30-03:00")
    before = utc(SPRING_FORWARD, "00:00") - timedelta(days=1)
    assert open_minutes(list(inside), before, 48) == 0
    assert next_opening(inside, before, BERLIN) == local(
        SPRING_FORWARD + timedelta(days=7), "02:30"
    )
    shifted = parse_windows("02:15-02:45")
    assert next_opening(shifted, before + timedelta(days=1), BERLIN) == local(
        SPRING_FORWARD, "03:15"
    )
    assert open_minutes(list(shifted), before + timedelta(days=1), 24) == 30


def _naive_is_open(window: Window, at: datetime, zone: ZoneInfo) -> bool:
    """An independent reading by wall clock, right when no bound falls in a changed hour."""
    here = at.astimezone(zone)
    wall, day = here.time().replace(tzinfo=None, fold=0), here.date()

    def opens(d: date) -> bool:
        return window.weekdays is None or d.weekday() in window.weekdays

    if window.end > window.start:
        return window.start <= wall < window.end and opens(day)
    if wall >= window.start:
        return opens(day)
    return wall < window.end and opens(day - timedelta(days=1))


def _random_window(rng: random.Random) -> Window:
    # Bounds away from 02:00-03:00, the hour Berlin's clock changes skip or repeat.
    hours = [h for h in range(24) if h != 2]
    days = frozenset(d for d in range(7) if rng.random() < 0.4) or None
    start = time(rng.choice(hours), rng.choice((0, 15, 30, 45)))
    end = time(rng.choice(hours), rng.choice((0, 15, 30, 45)))
    return Window(start, end, days)


def test_is_open_agrees_with_the_wall_clock() -> None:
    rng = random.Random(11)
    around = [SPRING_FORWARD, FALL_BACK, FRIDAY, date(2024, 12, 31)]
    for _ in range(300):
        window = _random_window(rng)
        for _ in range(20):
            at = utc(rng.choice(around), "00:00") + rng.randrange(-3 * 1440, 3 * 1440) * MINUTE
            assert is_open([window], at, BERLIN) == _naive_is_open(window, at, BERLIN), (
                format_window(window),
                at,
            )


def test_next_opening_is_the_first_open_instant() -> None:
    rng = random.Random(12)
    for _ in range(150):
        windows = [_random_window(rng) for _ in range(rng.randint(1, 3))]
        day = rng.choice([SPRING_FORWARD, FALL_BACK, FRIDAY]) - timedelta(days=rng.randrange(8))
        at = utc(day, "00:00") + rng.randrange(96) * QUARTER
        opening = next_opening(windows, at, BERLIN)
        assert opening is not None
        assert opening >= at
        assert is_open(windows, opening, BERLIN)
        probe = at
        while probe < opening:
            assert not is_open(windows, probe, BERLIN), ([format_window(w) for w in windows], at)
            probe += QUARTER
