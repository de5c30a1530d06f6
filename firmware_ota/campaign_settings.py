"""A campaign's settings as plain data: checked once at creation, stored as JSON, read back
by the driver on every pass."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any, Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from firmware_ota.maintenance_windows import Window, parse_window
from firmware_ota.rollout_rates import RateLimits, check_rate_limits
from firmware_ota.rollout_waves import DEFAULT_WAVES, FailureAction, WaveSpec, check_waves
from twin.errors import InvalidArgument

DEFAULT_DEVICE_TIMEOUT_SECONDS: Final = 3600
DEFAULT_MAX_ATTEMPTS: Final = 3
DEFAULT_RETRY_BACKOFF_SECONDS: Final = 60
MAX_ATTEMPTS_LIMIT: Final = 20
MAX_WINDOWS: Final = 16
# A week: longer than any device could plausibly need for one attempt.
MAX_DEVICE_TIMEOUT_SECONDS: Final = 7 * 24 * 3600


@dataclass(frozen=True)
class CampaignSettings:
    """How a campaign rolls out; see CampaignService in firmware.proto for each member."""

    waves: tuple[WaveSpec, ...] = DEFAULT_WAVES
    rate_limits: RateLimits = field(default_factory=RateLimits)
    device_timeout_seconds: int = DEFAULT_DEVICE_TIMEOUT_SECONDS
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    retry_backoff_seconds: int = DEFAULT_RETRY_BACKOFF_SECONDS
    download_windows: tuple[str, ...] = ()
    install_windows: tuple[str, ...] = ()
    time_zone: str = ""
    allow_downgrade: bool = False

    @property
    def device_timeout(self) -> timedelta:
        """How long one attempt may take."""
        return timedelta(seconds=self.device_timeout_seconds)

    @property
    def retry_backoff(self) -> timedelta:
        """The wait before the first retry."""
        return timedelta(seconds=self.retry_backoff_seconds)

    def windows(self, which: str) -> tuple[Window, ...]:
        """The parsed download or install windows."""
        texts = self.download_windows if which == "download" else self.install_windows
        return tuple(parse_window(text) for text in texts)


def check_settings(settings: CampaignSettings) -> None:
    """InvalidArgument naming the first setting that makes no sense."""
    check_waves(settings.waves)
    check_rate_limits(settings.rate_limits)
    if not 1 <= settings.device_timeout_seconds <= MAX_DEVICE_TIMEOUT_SECONDS:
        raise InvalidArgument(
            f"device_timeout_seconds must be between 1 and {MAX_DEVICE_TIMEOUT_SECONDS}"
        )
    if not 1 <= settings.max_attempts <= MAX_ATTEMPTS_LIMIT:
        raise InvalidArgument(f"max_attempts must be between 1 and {MAX_ATTEMPTS_LIMIT}")
    if settings.retry_backoff_seconds < 1:
        raise InvalidArgument("retry_backoff_seconds must be at least 1")
    for which in ("download", "install"):
        texts = settings.download_windows if which == "download" else settings.install_windows
        if len(texts) > MAX_WINDOWS:
            raise InvalidArgument(f"{which}_windows lists more than {MAX_WINDOWS} windows")
        settings.windows(which)
    if settings.time_zone:
        zone_of(settings.time_zone)


def zone_of(name: str) -> ZoneInfo:
    """The IANA time zone `name`; InvalidArgument if there is none such."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidArgument(f"unknown time zone {name!r}") from None


def settings_to_json(settings: CampaignSettings) -> dict[str, Any]:
    """The stored form."""
    return asdict(settings)


def settings_from_json(data: dict[str, Any]) -> CampaignSettings:
    """Read back what settings_to_json stored."""
    waves = tuple(
        WaveSpec(**{**w, "on_failure": FailureAction(w["on_failure"])}) for w in data["waves"]
    )
    return CampaignSettings(
        waves=waves,
        rate_limits=RateLimits(**data["rate_limits"]),
        device_timeout_seconds=data["device_timeout_seconds"],
        max_attempts=data["max_attempts"],
        retry_backoff_seconds=data["retry_backoff_seconds"],
        download_windows=tuple(data["download_windows"]),
        install_windows=tuple(data["install_windows"]),
        time_zone=data["time_zone"],
        allow_downgrade=data["allow_downgrade"],
    )
