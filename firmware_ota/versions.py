"""Firmware versions (SemVer 2.0) and the rules on which version may replace which.

A version is `MAJOR.MINOR.PATCH[-PRERELEASE][+BUILD]` exactly as https://semver.org (2.0.0)
defines it: numeric parts without leading zeros, dot-separated pre-release and build
identifiers of `[0-9A-Za-z-]`, numeric pre-release identifiers without leading zeros. No "v"
prefix, no short forms ("2.1"), at most `MAX_VERSION_LENGTH` characters.

Ordering is SemVer precedence: major, minor, patch numerically, then a version with a
pre-release sorts before the same version without one (2.1.0-rc.1 < 2.1.0), pre-release
identifiers compare left to right (numeric ones numerically and below alphanumeric ones, a
longer list after its prefix). Build metadata is kept (MCUboot images carry their build number
there: "2.1.0+7") and printed, but ignored by ordering, by `==` and by hashing, as SemVer says
and as MCUboot's own downgrade check does by default; compare `str(v)` to tell builds apart.

Which version may be installed on a device (`downgrade_refusal`):

* The MCUboot security counter may never go down, whatever the campaign allows: the bootloader
  would refuse the image and the device would come back failed. An image without a counter
  counts as 0 (as the artifact record stores it); a device that reports no counter is not
  checked.
* A lower version than the device runs is refused unless the campaign allows downgrades
  (rollback campaigns do). The same version (same precedence) is not a downgrade.
* A device whose running version is unknown (never reported) or not a semantic version may be
  running anything, even something newer, so it is treated like a possible downgrade: refused
  unless downgrades are allowed.

An artifact may also name the oldest version it may upgrade from (`upgrade_path_refusal`),
e.g. because it migrates data only from that release on; a device on an older or unknown
version must first go through an intermediate release.

Everything here is pure.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from twin.errors import InvalidArgument

__all__ = [
    "MAX_VERSION_LENGTH",
    "Version",
    "downgrade_refusal",
    "parse_version",
    "upgrade_path_refusal",
]

MAX_VERSION_LENGTH = 128

# [0-9] rather than \d, which also matches non-ASCII digits.
_NUMBER = r"0|[1-9][0-9]*"
_PRERELEASE_ID = r"0|[1-9][0-9]*|[0-9]*[A-Za-z-][0-9A-Za-z-]*"
_BUILD_ID = r"[0-9A-Za-z-]+"
_VERSION = re.compile(
    rf"(?P<major>{_NUMBER})\.(?P<minor>{_NUMBER})\.(?P<patch>{_NUMBER})"
    rf"(?:-(?P<prerelease>(?:{_PRERELEASE_ID})(?:\.(?:{_PRERELEASE_ID}))*))?"
    rf"(?:\+(?P<build>{_BUILD_ID}(?:\.{_BUILD_ID})*))?"
)
_PRERELEASE_ID_RE = re.compile(_PRERELEASE_ID)
_BUILD_ID_RE = re.compile(_BUILD_ID)
_FORMAT = 'MAJOR.MINOR.PATCH[-PRERELEASE][+BUILD], e.g. "2.1.0" or "2.1.0+7"'

# Precedence key of one pre-release identifier: numeric identifiers sort before alphanumeric
# ones, so each key starts with a rank that puts them first.
_NUMERIC_RANK = 0
_ALPHANUMERIC_RANK = 1
# A release sorts after all of its pre-releases.
_PRERELEASE_RANK = 0
_RELEASE_RANK = 1


@dataclass(frozen=True, slots=True)
class Version:
    """A semantic version, ordered by SemVer precedence.

    `prerelease` and `build` hold the dot-separated identifiers as written. `build` takes no
    part in comparisons, equality or hashing (see the module docstring). Constructing one
    directly checks the parts, so `str()` always gives text `parse_version` reads back.
    """

    major: int
    minor: int
    patch: int
    prerelease: tuple[str, ...] = ()
    build: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        for name, number in (("major", self.major), ("minor", self.minor), ("patch", self.patch)):
            if isinstance(number, bool) or not isinstance(number, int) or number < 0:
                raise InvalidArgument(f"version {name}: must be an integer >= 0, got {number!r}")
        for identifier in self.prerelease:
            if not _PRERELEASE_ID_RE.fullmatch(identifier):
                raise InvalidArgument(f"version pre-release: bad identifier {identifier!r}")
        for identifier in self.build:
            if not _BUILD_ID_RE.fullmatch(identifier):
                raise InvalidArgument(f"version build: bad identifier {identifier!r}")

    def __str__(self) -> str:
        text = f"{self.major}.{self.minor}.{self.patch}"
        if self.prerelease:
            text += "-" + ".".join(self.prerelease)
        if self.build:
            text += "+" + ".".join(self.build)
        return text

    def _precedence(self) -> tuple[int, int, int, int, tuple[tuple[int, int, str], ...]]:
        if not self.prerelease:
            return (self.major, self.minor, self.patch, _RELEASE_RANK, ())
        identifiers = tuple(
            (_NUMERIC_RANK, int(part), "") if part.isdigit() else (_ALPHANUMERIC_RANK, 0, part)
            for part in self.prerelease
        )
        return (self.major, self.minor, self.patch, _PRERELEASE_RANK, identifiers)

    def __lt__(self, other: Version) -> bool:
        return self._precedence() < other._precedence()

    def __le__(self, other: Version) -> bool:
        return self._precedence() <= other._precedence()

    def __gt__(self, other: Version) -> bool:
        return self._precedence() > other._precedence()

    def __ge__(self, other: Version) -> bool:
        return self._precedence() >= other._precedence()


def parse_version(text: str, *, name: str = "version") -> Version:
    """Read a semantic version such as "2.1.0", "2.1.0-rc.1" or "2.1.0+7" (MCUboot).

    Raises InvalidArgument naming `name` (the field the text came from) and quoting the text
    when it is not a SemVer 2.0 version or longer than `MAX_VERSION_LENGTH`.
    """
    if len(text) > MAX_VERSION_LENGTH:
        raise InvalidArgument(f"{name}: longer than {MAX_VERSION_LENGTH} characters")
    match = _VERSION.fullmatch(text)
    if match is None:
        raise InvalidArgument(f"{name}: {text!r} is not a semantic version ({_FORMAT})")
    prerelease = match["prerelease"]
    build = match["build"]
    return Version(
        major=int(match["major"]),
        minor=int(match["minor"]),
        patch=int(match["patch"]),
        prerelease=tuple(prerelease.split(".")) if prerelease else (),
        build=tuple(build.split(".")) if build else (),
    )


def _running_version(current: str | None) -> Version | None:
    """The device's running version, or None when it is unknown or unreadable."""
    if not current:
        return None
    try:
        return parse_version(current)
    except InvalidArgument:
        return None


def _describe_current(current: str | None) -> str:
    if not current:
        return "the device has not reported its running version"
    # A device may report anything; keep the message (an execution's detail) bounded.
    return f"the device's running version {current[:MAX_VERSION_LENGTH]!r} is not semantic"


def downgrade_refusal(
    current: str | None,
    current_security_counter: int | None,
    target: str,
    target_security_counter: int | None,
    allow_downgrade: bool,
) -> str | None:
    """Why `target` may not be installed on a device running `current`, or None if it may.

    `current` and `current_security_counter` are what the device reports (None or "" when it
    has not); `target` and `target_security_counter` describe the artifact (None: the image
    has no counter, taken as 0). The rules, in the order they are checked:

    1. the security counter never goes down, not even with `allow_downgrade`: the bootloader
       would refuse the image;
    2. a lower version is refused unless `allow_downgrade`;
    3. an unknown or unparseable running version is refused unless `allow_downgrade`, since
       the device might run something newer.

    The returned reason is meant for operators (an execution's detail). Raises
    InvalidArgument for a `target` that is not a semantic version or a negative
    `target_security_counter`: those come from the artifact, not the device.
    """
    wanted = parse_version(target, name="target version")
    if target_security_counter is not None and target_security_counter < 0:
        raise InvalidArgument(
            f"target security counter: must be >= 0, got {target_security_counter}"
        )
    target_counter = target_security_counter or 0
    if current_security_counter is not None and target_counter < current_security_counter:
        return (
            f"security counter would go down from {current_security_counter} to "
            f"{target_counter}; the bootloader refuses that even when downgrades are allowed"
        )
    if allow_downgrade:
        return None
    running = _running_version(current)
    if running is None:
        return f"{_describe_current(current)}, so {wanted} may be a downgrade (not allowed)"
    if wanted < running:
        return f"{wanted} is lower than the running {running} (downgrade not allowed)"
    return None


def upgrade_path_refusal(current: str | None, minimum_from: str | None) -> str | None:
    """Why a device running `current` may not take an artifact that upgrades only from
    `minimum_from` and later, or None if it may.

    `minimum_from` None or "" means any version may upgrade. A device whose running version
    is unknown or not semantic is refused when there is a minimum, since it cannot be shown
    to meet it. Raises InvalidArgument when `minimum_from` is not a semantic version.
    """
    if not minimum_from:
        return None
    minimum = parse_version(minimum_from, name="minimum from version")
    running = _running_version(current)
    if running is None:
        return f"{_describe_current(current)}; the artifact upgrades only from {minimum} on"
    if running < minimum:
        return (
            f"the running {running} is older than {minimum}, the oldest version the artifact "
            f"upgrades from; update to {minimum} or later first"
        )
    return None
