"""The device simulator: its behaviour rules without a server, then fleets of real aiocoap
devices against a running service, in this process and through `citytwin simulate`."""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import cbor2
import pytest
from google.protobuf import json_format
from google.protobuf.struct_pb2 import Struct

from citytwin.v1 import devices_pb2 as d
from citytwin.v1 import provisioning_pb2 as p
from citytwin.v1 import twins_pb2 as t
from tests.conftest import Api, Deployment, run_cli, unique
from twin.builtin_profiles import builtin_profile
from twin.cli.simulate_commands import summary_line
from twin.merge_patch import apply_merge_patch
from twin.profiles import validate_patch
from twin.senml import SENML_CBOR, decode_pack, latest_values, reported_patch
from twin.simulator.devices import (
    FAULTS,
    MODELS,
    Behaviour,
    DeviceState,
    Endpoint,
    FleetCounters,
    Kind,
    document_diff,
    fetch_ca_over_udp,
    follow_desired,
    new_state,
    next_readings,
    next_reported,
    offline_period,
    report_interval,
    senml_pack,
    split_host_port,
)
from twin.simulator.fleet import RUN_LABEL, Fleet, FleetPlan, GrpcInstaller, device_identity

T = TypeVar("T")
HOUR = 3600.0
WAIT_SECONDS = 15.0


def lamp(rng: random.Random | None = None) -> DeviceState:
    return new_state(Kind.LAMP, rng or random.Random(1), now=0.0)


def energy(state: DeviceState) -> dict[str, Any]:
    value = state.actual["energy"]
    assert isinstance(value, dict)
    return value


# --- behaviour, without a server -----------------------------------------------------------


@pytest.mark.parametrize("kind", list(Kind))
def test_what_a_new_device_reports_fits_its_profile(kind: Kind) -> None:
    profile = builtin_profile(MODELS[kind])
    assert profile is not None
    # Every fault flag the profile declares can be raised.
    flags = {
        s.path.removeprefix("faults.") for s in profile.properties if s.path.startswith("faults.")
    }
    assert flags == set(FAULTS[kind])
    rng = random.Random(3)
    state = new_state(kind, rng, now=0.0)
    validate_patch(profile, state.actual, document="reported")
    for _ in range(50):
        state = next_reported(state, 0.0, rng, fault_rate=0.5).state
        validate_patch(profile, state.actual, document="reported")
    if kind is Kind.SENSOR:
        # Telemetry goes through the service's own SenML decoder and the same profile.
        readings = state.readings
        for _ in range(200):
            readings = next_readings(readings, rng)
        pack = cbor2.dumps(senml_pack(readings, at=1_700_000_000.0))
        measurements = decode_pack(pack, SENML_CBOR, now=datetime.now(UTC))
        assert {m.name for m in measurements} == set(readings)
        assert all(m.time == datetime.fromtimestamp(1_700_000_000, UTC) for m in measurements)
        validate_patch(profile, reported_patch(latest_values(measurements)), document="reported")


def test_a_lamp_follows_its_desired_state_and_meters_its_energy() -> None:
    state = lamp()
    rated = state.rated_power_w
    on = follow_desired(state, {"power": True, "brightness": 50}, now=0.0)
    assert on.actual["power"] is True and on.actual["brightness"] == 50
    assert energy(on)["power_w"] == rated / 2
    # Only what changed is reported.
    assert set(document_diff(state.actual, on.actual)) <= {"power", "brightness", "energy"}
    start = energy(on)["total_wh"]
    later = next_reported(on, HOUR, random.Random(0), fault_rate=0.0).state
    assert energy(later)["total_wh"] == pytest.approx(start + rated / 2)
    # Switched off half an hour later: that half hour is metered, then nothing more.
    off = follow_desired(later, {"power": False}, now=1.5 * HOUR)
    assert energy(off)["total_wh"] == pytest.approx(start + rated * 0.75)
    assert energy(off)["power_w"] == 0.0
    idle = next_reported(off, 3 * HOUR, random.Random(0), fault_rate=0.0).state
    assert document_diff(off.actual, idle.actual) == {}
    # A desired state the lamp already has changes nothing.
    assert follow_desired(idle, {"power": False}, now=3 * HOUR).actual == idle.actual


def test_faults_come_at_their_rate_and_clear_again() -> None:
    rng = random.Random(5)
    state = follow_desired(lamp(rng), {"power": True, "brightness": 100}, now=0.0)
    for _ in range(200):
        assert not next_reported(state, 0.0, rng, fault_rate=0.0).raised
    tick = next_reported(state, 0.0, rng, fault_rate=1.0)
    (fault,) = tick.raised
    faulty = tick.state
    faults = faulty.actual["faults"]
    assert isinstance(faults, dict) and faults[fault] is True
    # A broken lamp draws nothing and says why.
    assert energy(faulty)["power_w"] == 0.0
    assert faulty.actual["fault_codes"] == [{"driver_failure": "DRV-01"}.get(fault, "LED-02")]
    cleared_after = None
    for n in range(1, 100):
        tick = next_reported(faulty, 0.0, rng, fault_rate=0.0)
        faulty = tick.state
        if tick.cleared:
            cleared_after = n
            break
    assert cleared_after is not None
    assert energy(faulty)["power_w"] == faulty.rated_power_w
    assert faulty.actual["fault_codes"] == []
    camera = next_reported(new_state(Kind.CAMERA, rng, 0.0), 0.0, rng, fault_rate=1.0).state
    assert camera.actual["storage_health"] == "failed"


def test_the_seed_decides_the_behaviour() -> None:
    def story(seed: str) -> list[object]:
        rng = random.Random(seed)
        state = new_state(Kind.LAMP, rng, 0.0)
        seen: list[object] = []
        for step in range(1, 60):
            if step % 10 == 0:
                state = follow_desired(state, {"power": step % 20 == 0}, float(step))
            state = next_reported(state, float(step), rng, fault_rate=0.3).state
            seen.append(state.actual)
            seen.append(offline_period(Behaviour(offline_rate=0.2), rng))
        return seen

    assert story("1/lamp/1") == story("1/lamp/1")
    assert story("1/lamp/1") != story("1/lamp/2")


def test_a_report_is_the_merge_patch_from_the_last_committed_state() -> None:
    old = {"a": 1, "b": {"c": 2, "d": 3}, "e": [1, 2], "gone": True}
    new = {"a": 1.0, "b": {"c": 2, "d": 4, "f": {"g": 5}}, "e": [1, 2, 3], "h": "x"}
    patch = document_diff(old, new)  # type: ignore[arg-type]
    assert patch == {"b": {"d": 4, "f": {"g": 5}}, "e": [1, 2, 3], "h": "x", "gone": None}
    assert apply_merge_patch(old, patch) == new  # type: ignore[arg-type]
    assert document_diff(new, new) == {}  # type: ignore[arg-type]


def test_offline_periods_and_intervals() -> None:
    rng = random.Random(2)
    behaviour = Behaviour(interval=10.0, offline_rate=1.0)
    assert all(25.0 <= (offline_period(behaviour, rng) or 0) <= 75.0 for _ in range(100))
    assert all(offline_period(Behaviour(offline_rate=0.0), rng) is None for _ in range(100))
    sensor = new_state(Kind.SENSOR, rng, 0.0)
    assert 9.0 <= report_interval(sensor, behaviour, rng) <= 11.0
    slower = follow_desired(sensor, {"report_interval": 600}, 0.0)
    assert 540.0 <= report_interval(slower, behaviour, rng) <= 660.0
    for wrong in ({"interval": 0.0}, {"fault_rate": 1.5}, {"offline_rate": -0.1}):
        with pytest.raises(ValueError):
            Behaviour(**wrong)


def test_a_run_names_and_labels_its_devices() -> None:
    plan = FleetPlan(lamps=2, sensors=1, cameras=1, labels={"district": "north"}, run_id="a1b2c3")
    assert plan.members() == [
        (Kind.LAMP, 1),
        (Kind.LAMP, 2),
        (Kind.SENSOR, 1),
        (Kind.CAMERA, 1),
    ]
    names = [device_identity(plan.run_id, kind, n) for kind, n in plan.members()]
    assert names[0] == ("sim-a1b2c3-lamp-0001", "SIM-A1B2C3-L0001")
    assert len({serial for _, serial in names}) == len(names)
    assert all(re.fullmatch(r"[a-z0-9][a-z0-9-]{0,62}", device_id) for device_id, _ in names)
    assert plan.device_labels() == {"district": "north", RUN_LABEL: "a1b2c3"}
    assert FleetPlan().run_id != FleetPlan().run_id


def test_endpoints_and_summaries() -> None:
    assert split_host_port("127.0.0.1:5684", 1) == ("127.0.0.1", 5684)
    assert split_host_port("[::1]", 5683) == ("::1", 5683)
    assert split_host_port("localhost", 5683) == ("localhost", 5683)
    assert Endpoint("::1", 5684, b"").uri("/twin") == "coaps+tcp://[::1]:5684/twin"
    for wrong in ("", ":5684", "host:99999", "host:port"):
        with pytest.raises(ValueError):
            split_host_port(wrong, 5683)
    line = summary_line(FleetCounters(devices=6, enrolled=5, enroll_failed=1, reports_ok=9), 3.0)
    assert "enrolled 5/6 (1 failed)" in line and "reports 9 ok 0 failed" in line


# --- fleets against a running service --------------------------------------------------------


async def eventually(check: Callable[[], Awaitable[T | None]], what: str) -> T:
    """The first truthy result of `check`, polled for up to WAIT_SECONDS."""
    try:
        async with asyncio.timeout(WAIT_SECONDS):
            while True:
                result = await check()
                if result:
                    return result
                await asyncio.sleep(0.2)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


async def call(api: Api, method: Any, request: Any) -> Any:
    """A gRPC call off the event loop, so the simulated devices keep running meanwhile."""
    return await asyncio.to_thread(api.call, method, request)


async def reported(api: Api, device_id: str) -> dict[str, Any]:
    twin = await call(api, api.twins.GetTwin, t.GetTwinRequest(name=f"devices/{device_id}"))
    result: dict[str, Any] = json_format.MessageToDict(twin.reported)
    return result


async def set_desired(api: Api, device_id: str, patch: dict[str, Any]) -> None:
    await call(
        api,
        api.twins.UpdateDesired,
        t.UpdateDesiredRequest(
            name=f"devices/{device_id}/twin", patch=json_format.ParseDict(patch, Struct())
        ),
    )


async def start_fleet(
    deployment: Deployment, plan: FleetPlan, behaviour: Behaviour, installer: GrpcInstaller
) -> tuple[Fleet, asyncio.Event, asyncio.Task[None]]:
    trust = await fetch_ca_over_udp("127.0.0.1", deployment.server.coap_port)
    endpoint = Endpoint("127.0.0.1", deployment.server.coaps_port, trust)
    fleet = Fleet(plan, behaviour, endpoint, installer)
    stop = asyncio.Event()
    return fleet, stop, asyncio.create_task(fleet.run(stop))


async def test_a_fleet_enrolls_reports_follows_desired_and_sends_telemetry(
    deployment: Deployment,
) -> None:
    api = deployment.api("admin")
    plan = FleetPlan(lamps=3, sensors=2, cameras=1, labels={"district": unique("sim")}, seed=4)
    behaviour = Behaviour(interval=0.5, fault_rate=0.2)
    async with GrpcInstaller(deployment.server.address, deployment.tokens["installer"]) as who:
        fleet, stop, running = await start_fleet(deployment, plan, behaviour, who)
        try:

            async def all_active() -> list[d.Device] | None:
                listed = await call(
                    api,
                    api.devices.ListDevices,
                    d.ListDevicesRequest(filter=f"{RUN_LABEL}={plan.run_id}"),
                )
                devices = list(listed.devices)
                active = len(devices) == 6 and all(x.state == d.ACTIVE for x in devices)
                return devices if active else None

            devices = await eventually(all_active, "six active devices")
            assert sorted(x.model for x in devices) == sorted(
                [MODELS[Kind.LAMP]] * 3 + [MODELS[Kind.SENSOR]] * 2 + [MODELS[Kind.CAMERA]]
            )
            assert all(x.labels["district"] == plan.labels["district"] for x in devices)
            first_lamp, first_sensor = fleet.of_kind(Kind.LAMP)[0], fleet.of_kind(Kind.SENSOR)[0]
            state = await reported(api, first_lamp.device_id)
            assert state["firmware"] == {"version": "2.0.3"} and "total_wh" in state["energy"]
            camera = await reported(api, fleet.of_kind(Kind.CAMERA)[0].device_id)
            assert camera["recording"] is True

            await set_desired(api, first_lamp.device_id, {"power": True, "brightness": 37})

            async def lamp_followed() -> dict[str, Any] | None:
                now = await reported(api, first_lamp.device_id)
                return now if now.get("brightness") == 37 and now.get("power") else None

            followed = await eventually(lamp_followed, "the lamp to follow its desired state")
            faults = followed["faults"]
            lit = not (faults["driver_failure"] or faults["lamp_failure"])
            expected_w = round(first_lamp.state.rated_power_w * 0.37, 1) if lit else 0.0
            assert followed["energy"]["power_w"] == expected_w
            assert fleet.counters.desired_applied >= 1

            async def telemetry() -> list[t.TelemetrySample] | None:
                page = await call(
                    api,
                    api.twins.ReadTelemetry,
                    t.ReadTelemetryRequest(name=f"devices/{first_sensor.device_id}"),
                )
                return list(page.samples) or None

            samples = await eventually(telemetry, "sensor telemetry")
            names = {s.measurement for s in samples}
            assert {"pm2_5", "pm10", "no2", "noise_db", "battery", "parking_occupied"} <= names
            assert {s.unit for s in samples if s.measurement == "noise_db"} == {"dB"}

            # Lamps send their meter as telemetry, which is what energy summaries read.
            async def meter() -> list[t.TelemetrySample] | None:
                page = await call(
                    api,
                    api.twins.ReadTelemetry,
                    t.ReadTelemetryRequest(
                        name=f"devices/{first_lamp.device_id}", measurement="energy.total_wh"
                    ),
                )
                return list(page.samples) or None

            readings = await eventually(meter, "lamp meter readings")
            assert {s.unit for s in readings} == {"Wh"}
        finally:
            stop.set()
            await asyncio.wait_for(running, 20)
    counters = fleet.counters
    assert counters.enrolled == 6 and counters.enroll_failed == 0
    assert counters.reports_failed == 0 and counters.refused == 0 and fleet.problems == []
    assert counters.connected == 0 and counters.reports_ok > 6


async def test_a_device_catches_up_after_being_offline_and_stops_when_revoked(
    deployment: Deployment,
) -> None:
    api = deployment.api("admin")
    plan = FleetPlan(lamps=1, seed=9)
    behaviour = Behaviour(interval=0.3, offline_rate=1.0, offline_seconds=1.0)
    async with GrpcInstaller(deployment.server.address, deployment.tokens["admin"]) as who:
        fleet, stop, running = await start_fleet(deployment, plan, behaviour, who)
        try:
            (device,) = fleet.devices

            async def offline() -> bool:
                return fleet.counters.offline == 1

            await eventually(offline, "the lamp to go offline")
            # Set while the lamp is away: its next connection's first answer carries it.
            await set_desired(api, device.device_id, {"brightness": 61})

            async def caught_up() -> bool:
                return (await reported(api, device.device_id)).get("brightness") == 61

            await eventually(caught_up, "the lamp to catch up")
            assert fleet.counters.offline_periods >= 1
            assert device.certificate is not None
            await call(
                api,
                api.provisioning.RevokeCertificate,
                p.RevokeCertificateRequest(
                    name=f"certificates/{device.certificate.serial_number:x}", reason="test"
                ),
            )
            # A refused device gives up: the run ends on its own.
            await asyncio.wait_for(running, 20)
        finally:
            stop.set()
            await asyncio.wait_for(running, 20)
    assert fleet.counters.refused == 1 and fleet.counters.connected == 0


def test_the_command_runs_for_its_duration_and_prints_the_counters(
    deployment: Deployment,
) -> None:
    district = unique("sim")
    # An installer confined to one district can run a fleet there.
    token = deployment.token("installer", scope=f"district={district}")
    server = deployment.server
    result = run_cli(
        deployment.db,
        "simulate",
        *("--lamps", "1", "--sensors", "1", "--cameras", "1", "--interval", "0.5"),
        *("--duration", "3", "--seed", "1", "--label", f"district={district}"),
        *("--address", server.address, "--token", token),
        *("--coap", f"127.0.0.1:{server.coaps_port}"),
        *("--coap-udp", f"127.0.0.1:{server.coap_port}"),
        check=False,
    )
    assert result.returncode == 0, result.stderr
    final = [line for line in result.stdout.splitlines() if line.startswith("final:")]
    assert len(final) == 1 and "enrolled 3/3" in final[0], result.stdout
    assert "trusting the CA" in result.stderr
    listed = deployment.api("admin").call(
        deployment.api().devices.ListDevices, d.ListDevicesRequest(filter=f"district={district}")
    )
    assert [x.state for x in listed.devices] == [d.ACTIVE] * 3


def test_the_command_stops_at_once_when_the_token_may_not_enroll(
    deployment: Deployment,
) -> None:
    server = deployment.server
    result = run_cli(
        deployment.db,
        "simulate",
        *("--lamps", "2", "--duration", "30"),
        *("--address", server.address, "--token", deployment.tokens["viewer"]),
        *("--coap", f"127.0.0.1:{server.coaps_port}"),
        *("--coap-udp", f"127.0.0.1:{server.coap_port}"),
        check=False,
    )
    assert result.returncode == 2
    assert "PERMISSION_DENIED" in result.stderr
