"""Maintenance windows: when, in a device's local time, a campaign may have it download or
install.

A campaign keeps separate windows for downloading and for installing: street lamps may fetch
an image at night but install (and reboot) only by day, when they are off. No windows means
any time.

Grammar of one window (case-insensitive day names, whitespace between the parts):

    window := [days " "] HH:MM "-" HH:MM       "22:00-06:00", "Mon-Fri 09:00-16:00"
    days   := day-item ("," day-item)*          "Sat,Sun", "Mon-Wed,Fri"
    day-item := day | day "-" day               a range may wrap round: "Fri-Mon"
    day    := Mon | Tue | Wed | Thu | Fri | Sat | Sun

and of a list of windows, `;` separating them (commas separate days already):

    windows := "" | window (";" window)*        "Mon-Fri 09:00-16:00; Sat 10:00-12:00"

Times are 00:00..23:59; the end may also be 24:00, the end of the day ("Sat,Sun
00:00-24:00" is the whole weekend). An end at or before the start crosses midnight:
"22:00-06:00" runs to 06:00 the next morning, "08:00-08:00" lasts a full day. The days are
those on which the window opens: "Fri 22:00-06:00" is open early on Saturday, not on Friday.

The times are wall-clock times of the device's zone, resolved afresh on each day, so a window
keeps its local hours across daylight-saving changes. A time the clocks skip is read with the
offset before the change, landing as much later as the gap is long (as in RFC 5545 and
`twin.dimming_schedule`); a time that occurs twice means its first occurrence. A 02:00-04:00
window in Europe/Berlin is therefore open for one hour on the spring-forward night (03:00 to
04:00 summer time) and three on the fall-back night (02:00 summer time to 04:00 winter time).

Everything here is pure.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from twin.errors import InvalidArgument

__all__ = [
    "DAY_NAMES",
    "MAX_WINDOWS",
    "MAX_WINDOWS_TEXT_LENGTH",
    "MAX_WINDOW_TEXT_LENGTH",
    "Window",
    "format_window",
    "is_open",
    "next_opening",
    "parse_window",
    "parse_windows",
]

# Indexed by `date.weekday()`: Monday is 0.
DAY_NAMES = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_DAYS_PER_WEEK = len(DAY_NAMES)
MAX_WINDOW_TEXT_LENGTH = 100
MAX_WINDOWS = 32
MAX_WINDOWS_TEXT_LENGTH = 2048
_WINDOW_SEPARATOR = ";"
_END_OF_DAY = "24:00"
# Today and the two weeks after: a weekly window opens again within a week, and the second
# week covers an opening that a clock change swallowed.
_SEARCH_DAYS = 2 * _DAYS_PER_WEEK + 1

# [0-9] rather than \d, which also matches non-ASCII digits.
_WINDOW = re.compile(
    r"(?:(?P<days>.*?)\s+)?(?P<start>[0-9]{2}:[0-9]{2})\s*-\s*(?P<end>[0-9]{2}:[0-9]{2})"
)
_CLOCK = re.compile(r"([01][0-9]|2[0-3]):([0-5][0-9])")
_DAY_INDEX = {name.lower(): index for index, name in enumerate(DAY_NAMES)}
_DAY_RULE = f"days are {', '.join(DAY_NAMES)}, single or as ranges such as Mon-Fri"
_WINDOW_RULE = 'must be "[days ]HH:MM-HH:MM", e.g. "22:00-06:00" or "Mon-Fri 09:00-16:00"'


@dataclass(frozen=True, slots=True)
class Window:
    """A daily or weekly local-time window (see the module docstring).

    `end` <= `start` crosses midnight (`end` == `start`: a full day). `weekdays` are the
    days (0 = Monday, as `date.weekday()`) on which the window opens, None for every day.
    Raises InvalidArgument for times with a time zone or seconds, or an empty or
    out-of-range day set.
    """

    start: time
    end: time
    weekdays: frozenset[int] | None = None

    def __post_init__(self) -> None:
        for name, at in (("start", self.start), ("end", self.end)):
            if at.tzinfo is not None or at.second or at.microsecond:
                raise InvalidArgument(
                    f"window {name}: must be a local wall-clock time in whole minutes, "
                    f"without a zone, got {at.isoformat()}"
                )
        if self.weekdays is not None and (
            not self.weekdays or not self.weekdays <= frozenset(range(_DAYS_PER_WEEK))
        ):
            raise InvalidArgument(
                f"window weekdays: must be a non-empty set of 0..6, got {sorted(self.weekdays)}"
            )


def _occurrence(window: Window, day: date, zone: ZoneInfo) -> tuple[datetime, datetime] | None:
    """The instants (UTC) `window` opens and closes if it opens on local `day`.

    None when it does not open that day, or when a clock change leaves nothing of it:
    02:30-03:00 on a night the clocks jump from 02:00 to 03:00 would open at 03:30 (the
    skipped 02:30 read as above) after closing at 03:00.
    """
    if window.weekdays is not None and day.weekday() not in window.weekdays:
        return None
    end_day = day if window.end > window.start else day + timedelta(days=1)
    opens, closes = _instant(day, window.start, zone), _instant(end_day, window.end, zone)
    return (opens, closes) if opens < closes else None


def _instant(day: date, at: time, zone: ZoneInfo) -> datetime:
    """The UTC instant of wall time `at` on `day` in `zone`.

    Built with fold 0 (whatever `at.fold` says), which reads a skipped time with the offset
    before the change and a repeated time as its first occurrence.
    """
    local = datetime(day.year, day.month, day.day, at.hour, at.minute, tzinfo=zone)
    return local.astimezone(UTC)


def _clock(text: str, window: str, allow_end_of_day: bool) -> time:
    if allow_end_of_day and text == _END_OF_DAY:
        return time(0)
    match = _CLOCK.fullmatch(text)
    if match is None:
        limit = _END_OF_DAY if allow_end_of_day else "23:59"
        raise InvalidArgument(f"window {window!r}: {text!r} is not a time 00:00..{limit}")
    return time(int(match[1]), int(match[2]))


def _day(text: str, window: str) -> int:
    index = _DAY_INDEX.get(text.strip().lower())
    if index is None:
        raise InvalidArgument(f"window {window!r}: unknown day {text.strip()!r}; {_DAY_RULE}")
    return index


def _days(text: str, window: str) -> frozenset[int]:
    days: set[int] = set()
    for item in text.split(","):
        first, dash, last = item.partition("-")
        begin = _day(first, window)
        finish = _day(last, window) if dash else begin
        # A range that wraps round (Fri-Mon) runs on through Sunday into the next week.
        length = (finish - begin) % _DAYS_PER_WEEK + 1
        days.update((begin + offset) % _DAYS_PER_WEEK for offset in range(length))
    return frozenset(days)


def parse_window(text: str) -> Window:
    """Read one window such as "22:00-06:00", "Mon-Fri 09:00-16:00" or "Sat,Sun 00:00-24:00".

    Raises InvalidArgument quoting the text and saying what is wrong with it.
    """
    if len(text) > MAX_WINDOW_TEXT_LENGTH:
        raise InvalidArgument(f"window: longer than {MAX_WINDOW_TEXT_LENGTH} characters")
    text = text.strip()
    match = _WINDOW.fullmatch(text)
    if match is None:
        raise InvalidArgument(f"window {text!r}: {_WINDOW_RULE}")
    days = match["days"]
    return Window(
        start=_clock(match["start"], text, allow_end_of_day=False),
        end=_clock(match["end"], text, allow_end_of_day=True),
        weekdays=None if days is None else _days(days, text),
    )


def parse_windows(text: str) -> tuple[Window, ...]:
    """Read windows separated by ";", e.g. "Mon-Fri 09:00-16:00; Sat 10:00-12:00".

    Blank text gives no windows (any time). At most `MAX_WINDOWS`. Raises InvalidArgument as
    `parse_window` does, or for an empty item.
    """
    if len(text) > MAX_WINDOWS_TEXT_LENGTH:
        raise InvalidArgument(f"windows: longer than {MAX_WINDOWS_TEXT_LENGTH} characters")
    if not text.strip():
        return ()
    items = text.split(_WINDOW_SEPARATOR)
    if len(items) > MAX_WINDOWS:
        raise InvalidArgument(f"windows: at most {MAX_WINDOWS} windows, got {len(items)}")
    for index, item in enumerate(items):
        if not item.strip():
            raise InvalidArgument(f"windows: item {index + 1} of {text!r} is empty")
    return tuple(parse_window(item) for item in items)


def _format_days(weekdays: frozenset[int]) -> str:
    """Days as `parse_window` reads them, runs of three or more as ranges ("Mon-Fri,Sun")."""
    runs: list[list[int]] = []
    for day in sorted(weekdays):
        if runs and runs[-1][-1] == day - 1:
            runs[-1].append(day)
        else:
            runs.append([day])
    parts: list[str] = []
    for run in runs:
        if len(run) >= 3:
            parts.append(f"{DAY_NAMES[run[0]]}-{DAY_NAMES[run[-1]]}")
        else:
            parts.extend(DAY_NAMES[day] for day in run)
    return ",".join(parts)


def format_window(window: Window) -> str:
    """The window as `parse_window` reads it back, e.g. "Mon-Fri 09:00-16:00"; an end at
    midnight is written 24:00."""
    start = window.start.strftime("%H:%M")
    end = _END_OF_DAY if window.end == time(0) else window.end.strftime("%H:%M")
    hours = f"{start}-{end}"
    if window.weekdays is None:
        return hours
    return f"{_format_days(window.weekdays)} {hours}"


def _in_utc(at: datetime) -> datetime:
    # In UTC, comparisons with the occurrences never meet an ambiguous local time.
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError("at: must be timezone-aware")
    return at.astimezone(UTC)


def is_open(windows: Sequence[Window], at: datetime, zone: ZoneInfo) -> bool:
    """Whether any of `windows`, in the local time of `zone`, is open at instant `at`.

    `at` must be timezone-aware (UTC, normally; ValueError otherwise). No windows: always
    open. A window is open from its opening instant up to, not including, its closing one.
    """
    if not windows:
        return True
    at = _in_utc(at)
    today = at.astimezone(zone).date()
    # The window that opened yesterday may cross midnight into today; none lasts longer.
    for day in (today - timedelta(days=1), today):
        for window in windows:
            occurrence = _occurrence(window, day, zone)
            if occurrence is not None and occurrence[0] <= at < occurrence[1]:
                return True
    return False


def next_opening(windows: Sequence[Window], at: datetime, zone: ZoneInfo) -> datetime | None:
    """The first instant (UTC) at or after `at` at which one of `windows` is open.

    `at` itself when a window is open then; None when there are no windows (always open, so
    there is nothing to wait for). `at` must be timezone-aware (ValueError otherwise).
    """
    if not windows:
        return None
    at = _in_utc(at)
    if is_open(windows, at, zone):
        return at
    today = at.astimezone(zone).date()
    openings = [
        occurrence[0]
        for offset in range(_SEARCH_DAYS)
        for window in windows
        if (occurrence := _occurrence(window, today + timedelta(days=offset), zone)) is not None
        and occurrence[0] > at
    ]
    # Empty only if clock changes left nothing of the window on the same weekday two weeks
    # running, which no zone's rules do; "never" (None) would be the honest answer then.
    return min(openings, default=None)
