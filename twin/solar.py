"""Sunrise, sunset and civil twilight from the NOAA solar position algorithm.

The equations are those of NOAA's solar calculator spreadsheet (after Meeus, *Astronomical
Algorithms*): Julian century, geometric mean longitude and anomaly, equation of centre,
apparent longitude, corrected obliquity, declination and equation of time, then the hour
angle at which the sun's centre reaches a given zenith distance:

* 90.833° for sunrise and sunset (the upper limb touches a sea-level horizon: 34' of
  standard refraction plus 16' of solar semi-diameter),
* 96° for civil dawn and dusk (the centre 6° below the horizon).

The spreadsheet evaluates the sun once per day; here each event is refined by re-evaluating
the sun at the event's own time, which keeps the error within about a minute up to the polar
circles. Everything here is pure: no clocks, no time zones beyond UTC, no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Literal, TypeAlias

__all__ = [
    "CIVIL_ZENITH",
    "SUNRISE_ZENITH",
    "Polar",
    "SunTimes",
    "solar_elevation",
    "sun_times",
]

Polar: TypeAlias = Literal["normal", "polar_day", "polar_night"]

SUNRISE_ZENITH = 90.833
CIVIL_ZENITH = 96.0

# Julian date of 0001-01-01T00:00Z minus its proleptic Gregorian ordinal (1).
_JD_ORDINAL_OFFSET = 1721424.5
_J2000 = 2451545.0
# Each pass moves the event by the change in declination and equation of time over the
# previous correction; a few passes settle it to well under a second away from the poles.
_REFINE_PASSES = 4


@dataclass(frozen=True, slots=True)
class SunTimes:
    """The sun's daily events at one place, all aware datetimes in UTC.

    `polar` tells why `sunrise`/`sunset` are None: "polar_day" when the sun stays above the
    horizon all day, "polar_night" when it stays below. `civil_polar` does the same for
    `civil_dawn`/`civil_dusk` against the -6° circle (so a high-latitude summer night can be
    "polar_day" for civil twilight, the white nights, while the sun still sets).
    """

    solar_noon: datetime
    sunrise: datetime | None
    sunset: datetime | None
    civil_dawn: datetime | None
    civil_dusk: datetime | None
    polar: Polar
    civil_polar: Polar


@dataclass(frozen=True, slots=True)
class _Sun:
    declination: float  # degrees
    equation_of_time: float  # minutes


def _check_coordinates(latitude: float, longitude: float) -> None:
    for name, value, limit in (("latitude", latitude, 90.0), ("longitude", longitude, 180.0)):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{name}: must be a number, got {type(value).__name__}")
        if not math.isfinite(value) or not -limit <= value <= limit:
            raise ValueError(f"{name}: must be within -{limit:g}..{limit:g}, got {value!r}")


def _check_day(day: date) -> None:
    # A datetime is a date too, but its date part may not be the local day the caller means
    # (an aware datetime in another zone), so insist on a plain date.
    if isinstance(day, datetime) or not isinstance(day, date):
        raise ValueError(f"day: must be a datetime.date, got {type(day).__name__}")


def _sun(julian_day: float) -> _Sun:
    """Declination and equation of time at a Julian date (NOAA spreadsheet columns G to V)."""
    jc = (julian_day - _J2000) / 36525.0
    mean_long = (280.46646 + jc * (36000.76983 + jc * 0.0003032)) % 360.0
    mean_anom = 357.52911 + jc * (35999.05029 - 0.0001537 * jc)
    ecc = 0.016708634 - jc * (0.000042037 + 0.0000001267 * jc)
    m = math.radians(mean_anom)
    centre = (
        math.sin(m) * (1.914602 - jc * (0.004817 + 0.000014 * jc))
        + math.sin(2 * m) * (0.019993 - 0.000101 * jc)
        + math.sin(3 * m) * 0.000289
    )
    omega = math.radians(125.04 - 1934.136 * jc)
    apparent_long = mean_long + centre - 0.00569 - 0.00478 * math.sin(omega)
    mean_obliq = (
        23.0 + (26.0 + (21.448 - jc * (46.815 + jc * (0.00059 - jc * 0.001813))) / 60.0) / 60.0
    )
    obliq = math.radians(mean_obliq + 0.00256 * math.cos(omega))
    declination = math.degrees(math.asin(math.sin(obliq) * math.sin(math.radians(apparent_long))))
    y = math.tan(obliq / 2) ** 2
    l0 = math.radians(mean_long)
    eot = 4.0 * math.degrees(
        y * math.sin(2 * l0)
        - 2 * ecc * math.sin(m)
        + 4 * ecc * y * math.sin(m) * math.cos(2 * l0)
        - 0.5 * y * y * math.sin(4 * l0)
        - 1.25 * ecc * ecc * math.sin(2 * m)
    )
    return _Sun(declination, eot)


def _cos_hour_angle(latitude: float, declination: float, zenith: float) -> float:
    """cos of the hour angle at which the sun is at `zenith`; outside -1..1 it never gets there.

    Written as (cos z - sin φ sin δ) / (cos φ cos δ) rather than the spreadsheet's tan form so
    that the poles, where cos φ is 0, still give an answer of the right sign.
    """
    phi = math.radians(latitude)
    delta = math.radians(declination)
    numerator = math.cos(math.radians(zenith)) - math.sin(phi) * math.sin(delta)
    denominator = math.cos(phi) * math.cos(delta)
    if abs(denominator) < 1e-12:
        return math.copysign(math.inf, numerator)
    return numerator / denominator


def _polar(cos_ha: float) -> Polar:
    if cos_ha > 1.0:
        return "polar_night"
    if cos_ha < -1.0:
        return "polar_day"
    return "normal"


def _event_minutes(
    jd0: float, latitude: float, longitude: float, zenith: float, morning: bool, start: float
) -> float:
    """Minutes after 0h UTC of the day (Julian date `jd0`) at which the event happens.

    Starts from `start` (solar noon) and re-evaluates the sun at each estimate. If a pass
    lands where the sun no longer reaches the zenith distance (it happens only within
    minutes of the start or end of a polar day or night), the hour angle is clamped, which
    puts the event at solar noon or midnight instead of dropping it.
    """
    minutes = start
    sign = -1.0 if morning else 1.0
    for _ in range(_REFINE_PASSES):
        sun = _sun(jd0 + minutes / 1440.0)
        cos_ha = max(-1.0, min(1.0, _cos_hour_angle(latitude, sun.declination, zenith)))
        hour_angle = math.degrees(math.acos(cos_ha))
        minutes = 720.0 - 4.0 * (longitude - sign * hour_angle) - sun.equation_of_time
    return minutes


def _at(day: date, minutes: float) -> datetime:
    midnight = datetime(day.year, day.month, day.day, tzinfo=UTC)
    return midnight + timedelta(seconds=round(minutes * 60.0))


def sun_times(latitude: float, longitude: float, day: date) -> SunTimes:
    """Solar noon, sunrise, sunset, civil dawn and civil dusk on `day` at a place.

    `latitude` is in degrees north (-90..90), `longitude` in degrees east (-180..180).
    `day` is the calendar day in local *solar* time at that longitude: the events returned
    are those around the solar noon that falls on `day` there, so sunrise is before and
    sunset after it even where they fall on another UTC date. (A civil time zone can differ
    from solar time by hours, by a whole day near the date line; callers that work in a
    civil zone pick the events that fall in their local day, as `twin.dimming_schedule`
    does.)

    An event that does not happen that day is None, and `polar`/`civil_polar` say whether
    the sun stays up or down; that is decided by the declination at solar noon, as in the
    NOAA spreadsheet.

    Raises ValueError naming `latitude`, `longitude` or `day` when one is out of range.
    """
    _check_coordinates(latitude, longitude)
    _check_day(day)
    jd0 = day.toordinal() + _JD_ORDINAL_OFFSET
    noon = 720.0 - 4.0 * longitude
    for _ in range(2):
        noon = 720.0 - 4.0 * longitude - _sun(jd0 + noon / 1440.0).equation_of_time
    declination = _sun(jd0 + noon / 1440.0).declination

    events: dict[tuple[float, bool], datetime | None] = {}
    states: dict[float, Polar] = {}
    for zenith in (SUNRISE_ZENITH, CIVIL_ZENITH):
        state = _polar(_cos_hour_angle(latitude, declination, zenith))
        states[zenith] = state
        for morning in (True, False):
            events[zenith, morning] = (
                _at(day, _event_minutes(jd0, latitude, longitude, zenith, morning, noon))
                if state == "normal"
                else None
            )
    return SunTimes(
        solar_noon=_at(day, noon),
        sunrise=events[SUNRISE_ZENITH, True],
        sunset=events[SUNRISE_ZENITH, False],
        civil_dawn=events[CIVIL_ZENITH, True],
        civil_dusk=events[CIVIL_ZENITH, False],
        polar=states[SUNRISE_ZENITH],
        civil_polar=states[CIVIL_ZENITH],
    )


def solar_elevation(latitude: float, longitude: float, moment: datetime) -> float:
    """The geometric elevation of the sun's centre in degrees (no refraction) at `moment`.

    `moment` must be an aware datetime. Sunrise and sunset from `sun_times` are where this
    is 90 - 90.833 = -0.833°; civil dawn and dusk where it is -6°.
    """
    _check_coordinates(latitude, longitude)
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError("moment: must be an aware datetime")
    utc = moment.astimezone(UTC)
    jd0 = utc.date().toordinal() + _JD_ORDINAL_OFFSET
    minutes = (utc - datetime(utc.year, utc.month, utc.day, tzinfo=UTC)).total_seconds() / 60.0
    sun = _sun(jd0 + minutes / 1440.0)
    # True solar time in minutes, then the hour angle (0 at solar noon, 15° an hour).
    solar_time = (minutes + sun.equation_of_time + 4.0 * longitude) % 1440.0
    hour_angle = math.radians(solar_time / 4.0 - 180.0)
    phi = math.radians(latitude)
    delta = math.radians(sun.declination)
    sin_elev = math.sin(phi) * math.sin(delta) + math.cos(phi) * math.cos(delta) * math.cos(
        hour_angle
    )
    return math.degrees(math.asin(max(-1.0, min(1.0, sin_elev))))
