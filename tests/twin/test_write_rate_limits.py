"""How often one device may write (twin/write_rate_limits.py), and the 4.29 a device gets
beyond it from a real server."""

from __future__ import annotations

import aiocoap
import cbor2
import pytest
from aiocoap.numbers.codes import Code

from tests.coap_devices import Site, coap_client, enrolled_device, request, twin_of
from twin.write_rate_limits import WriteRateLimiter

CBOR = 60


def test_a_burst_then_the_rate() -> None:
    limits = WriteRateLimiter(per_minute=6, burst=3)  # one write every 10 s
    assert [limits.take("lamp", 100.0) for _ in range(3)] == [0, 0, 0]
    assert limits.take("lamp", 100.0) == 10  # refused, and nothing taken
    assert limits.take("lamp", 104.5) == 6
    assert limits.take("lamp", 110.0) == 0
    assert limits.take("lamp", 110.0) == 10
    # Other devices have buckets of their own.
    assert limits.take("sensor", 110.0) == 0
    # A bucket refills to the burst, no further.
    assert [limits.take("lamp", 1000.0) for _ in range(4)] == [0, 0, 0, 10]


def test_the_wait_is_whole_seconds_and_at_least_one() -> None:
    limits = WriteRateLimiter(per_minute=600, burst=1)  # one every 0.1 s
    assert limits.take("lamp", 0.0) == 0
    assert limits.take("lamp", 0.01) == 1


def test_no_limit_and_bad_settings() -> None:
    unlimited = WriteRateLimiter(per_minute=0, burst=1)
    assert all(unlimited.take("lamp", 0.0) == 0 for _ in range(1000))
    assert len(unlimited) == 0
    with pytest.raises(ValueError, match="burst"):
        WriteRateLimiter(per_minute=6, burst=0)
    with pytest.raises(ValueError, match="per_minute"):
        WriteRateLimiter(per_minute=-1, burst=1)


def test_the_buckets_are_bounded() -> None:
    limits = WriteRateLimiter(per_minute=6, burst=1, max_devices=100)
    for n in range(1000):
        limits.take(f"device-{n}", 0.0)
    assert len(limits) == 100
    # A forgotten device starts again with a full bucket; a remembered one does not.
    assert limits.take("device-0", 0.0) == 0
    assert limits.take("device-999", 0.0) == 10


@pytest.mark.server_env(
    {"CITYTWIN_DEVICE_WRITES_PER_MINUTE": "1", "CITYTWIN_DEVICE_WRITE_BURST": "3"}
)
async def test_a_device_writing_too_often_gets_4_29_and_nothing_is_stored(
    own_site: Site,
) -> None:
    site = own_site
    flooder_id, cert, key = await enrolled_device(site)
    _, other_cert, other_key = await enrolled_device(site)
    uri = site.coaps + "/twin/reported"
    async with coap_client(site.trust, cert, key) as coap:
        for level in (10, 20, 30):
            answer = await request(
                coap, uri, aiocoap.POST, cbor2.dumps({"brightness": level}), content_format=CBOR
            )
            assert answer.code == Code.CHANGED, answer.payload
        before = twin_of(site, flooder_id)
        refused = await request(
            coap, uri, aiocoap.POST, cbor2.dumps({"brightness": 40}), content_format=CBOR
        )
        assert refused.code == Code.TOO_MANY_REQUESTS
        assert 1 <= refused.opt.max_age <= 60
        assert "writes more than 1 times a minute" in refused.payload.decode()
        # Telemetry and heartbeats draw on the same bucket.
        beat = await request(coap, site.coaps + "/twin/heartbeat", aiocoap.POST)
        assert beat.code == Code.TOO_MANY_REQUESTS
        # Reading is not writing.
        assert (await request(coap, site.coaps + "/twin")).code == Code.CONTENT
    assert twin_of(site, flooder_id) == before
    async with coap_client(site.trust, other_cert, other_key) as coap:
        answer = await request(
            coap, uri, aiocoap.POST, cbor2.dumps({"brightness": 50}), content_format=CBOR
        )
        assert answer.code == Code.CHANGED
