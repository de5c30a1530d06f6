"""The simulator's devices against a real campaign: they download, check and install what a
campaign sends them, through failures injected at their rates, until the campaign completes."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc

from citytwin.v1 import firmware_pb2 as f
from tests.conftest import Deployment, unique
from tests.firmware_ota.ota_devices import Release, upload
from tests.firmware_ota.test_campaigns_end_to_end import until
from tests.twin.test_simulator import call, eventually, reported, start_fleet
from twin.simulator.devices import Behaviour, Kind
from twin.simulator.fleet import FleetPlan, GrpcInstaller


async def test_simulated_lamps_update_in_a_campaign_despite_lost_connections(
    deployment: Deployment, tmp_path: Path
) -> None:
    api = deployment.api("admin")
    artifact = upload(api, Release(api, tmp_path).mcuboot("2.1.0", 40_000))
    district = unique("ota")
    # Seed 25 makes every lamp lose its connection part way through a download, one of them
    # twice in a row (the seed decides the losses: lamps 1, 1 and 2 times). A longer streak
    # only waits out longer retry backoffs (1, 2, 4, 8 s...) and proves nothing more.
    plan = FleetPlan(lamps=3, labels={"district": district}, seed=25)
    # Every other download breaks off part way: the retry resumes where it stopped.
    behaviour = Behaviour(interval=0.5, fw_connection_loss_rate=0.5, reboot_seconds=0.2)
    async with GrpcInstaller(deployment.server.address, deployment.tokens["installer"]) as who:
        fleet, stop, running = await start_fleet(deployment, plan, behaviour, who)
        try:
            created = await call(
                api,
                api.campaigns.CreateCampaign,
                f.CreateCampaignRequest(
                    campaign=f.Campaign(
                        artifact=artifact.name,
                        target_filter=f"district={district}",
                        waves=[f.Wave(percent=100)],
                        retry_backoff_seconds=1,
                        max_attempts=5,
                    )
                ),
            )

            async def all_reported() -> bool:
                try:
                    listed = [await reported(api, d.device_id) for d in fleet.of_kind(Kind.LAMP)]
                except grpc.RpcError as error:
                    # The simulator registers its devices as it starts them.
                    assert error.code() == grpc.StatusCode.NOT_FOUND
                    return False
                return len(listed) == 3 and all("firmware" in r for r in listed)

            await eventually(all_reported, "every lamp to report its firmware")
            await call(api, api.campaigns.StartCampaign, f.CampaignActionRequest(name=created.name))
            done = await until(
                api, created.name, lambda c: c.state == f.CAMPAIGN_STATE_COMPLETED, 90
            )
            versions = {
                (await reported(api, d.device_id))["firmware"]["version"]
                for d in fleet.of_kind(Kind.LAMP)
            }
        finally:
            stop.set()
            await asyncio.wait_for(running, 20)
    assert done.counts.succeeded == 3
    assert versions == {"2.1.0"}
    counters = fleet.counters
    assert counters.updates_succeeded == 3 and counters.firmware_downloads >= 3
    # The downloads really did break off (a failed update here is a lost connection).
    assert counters.updates_failed >= 1 and counters.disconnects >= counters.updates_failed
    assert counters.firmware_bytes >= 3 * artifact.size_bytes
