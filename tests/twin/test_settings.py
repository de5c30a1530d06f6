"""Reading settings from the environment: the device-side limits."""

from __future__ import annotations

import pytest

from twin.coap_tls import MAX_CONCURRENT_HANDSHAKES
from twin.settings import load_settings


def test_defaults() -> None:
    settings = load_settings({})
    assert settings.device_writes_per_minute == 300
    assert settings.device_write_burst == 60
    assert settings.coaps_max_handshakes == MAX_CONCURRENT_HANDSHAKES


def test_device_limits_from_the_environment() -> None:
    settings = load_settings(
        {
            "CITYTWIN_DEVICE_WRITES_PER_MINUTE": "0",
            "CITYTWIN_DEVICE_WRITE_BURST": "0",
            "CITYTWIN_COAPS_MAX_HANDSHAKES": "32",
        }
    )
    assert settings.device_writes_per_minute == 0  # no limit
    assert settings.device_write_burst == 1  # at least one write at a time
    assert settings.coaps_max_handshakes == 32


@pytest.mark.parametrize(
    "name",
    [
        "CITYTWIN_DEVICE_WRITES_PER_MINUTE",
        "CITYTWIN_DEVICE_WRITE_BURST",
        "CITYTWIN_COAPS_MAX_HANDSHAKES",
    ],
)
@pytest.mark.parametrize("value", ["many", "-5"])
def test_bad_values_stop_the_service_with_the_setting_named(name: str, value: str) -> None:
    with pytest.raises(SystemExit, match=name):
        load_settings({name: value})
