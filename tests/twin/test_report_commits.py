"""Group commit of device reports (twin/report_commits.py): how the committer groups and
isolates reports (with a stand-in for the database), and what many devices reporting at once
through a real server end up with."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from datetime import UTC, datetime

import aiocoap
import cbor2
from aiocoap.numbers.codes import Code
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf import json_format

from citytwin.v1 import devices_pb2 as d
from tests.coap_devices import Site, coap_client, enrolled_device, request, twin_of
from twin.access import device_principal
from twin.change_feed import FeedNotifier
from twin.errors import InvalidArgument
from twin.report_commits import Outcome, Report, ReportCommitter
from twin.twin_store import TwinView

CBOR, SENML_JSON = 60, 110


def _view(report: Report) -> TwinView:
    version = int(str(report.patch["n"]))
    return TwinView(report.device_id, {}, dict(report.patch), {}, {}, {}, version, None)


class FakeDatabase:
    """Stands in for commit_reports: records each group, can hold a commit until released,
    refuses reports with `"bad": true`, and fails any transaction that holds `"poison"`."""

    def __init__(self) -> None:
        self.groups: list[list[int]] = []
        self.committed: list[int] = []
        self.release = asyncio.Event()
        self.release.set()

    async def commit(self, reports: Sequence[Report], notifier: FeedNotifier) -> list[Outcome]:
        await self.release.wait()
        numbers = [int(str(r.patch["n"])) for r in reports]
        self.groups.append(numbers)
        if any("poison" in r.patch for r in reports):
            raise RuntimeError("the transaction failed")
        outcomes: list[Outcome] = []
        for report in reports:
            if report.patch.get("bad"):
                outcomes.append(InvalidArgument(f"report {report.patch['n']} is bad"))
            else:
                self.committed.append(int(str(report.patch["n"])))
                outcomes.append(_view(report))
        return outcomes


def report(n: int, **extra: object) -> Report:
    return Report("lamp-1", {"n": n, **extra}, device_principal("lamp-1"))


async def test_reports_arriving_during_a_commit_share_the_next_one() -> None:
    database = FakeDatabase()
    committer = ReportCommitter(FeedNotifier(), commit_group=database.commit)
    database.release.clear()
    first = asyncio.create_task(committer.commit(report(1)))
    await asyncio.sleep(0)  # the first group (just report 1) is now committing
    rest = [asyncio.create_task(committer.commit(report(n))) for n in range(2, 8)]
    await asyncio.sleep(0)
    database.release.set()
    views = await asyncio.gather(first, *rest)
    assert database.groups == [[1], [2, 3, 4, 5, 6, 7]]
    assert [v.version for v in views] == [1, 2, 3, 4, 5, 6, 7]  # each caller its own answer
    await committer.close()


async def test_groups_are_bounded() -> None:
    database = FakeDatabase()
    committer = ReportCommitter(FeedNotifier(), max_group=3, commit_group=database.commit)
    database.release.clear()
    tasks = [asyncio.create_task(committer.commit(report(n))) for n in range(1, 9)]
    await asyncio.sleep(0)
    database.release.set()
    await asyncio.gather(*tasks)
    assert database.groups == [[1, 2, 3], [4, 5, 6], [7, 8]]


async def test_a_refused_report_fails_alone() -> None:
    database = FakeDatabase()
    committer = ReportCommitter(FeedNotifier(), commit_group=database.commit)
    outcomes = await asyncio.gather(
        *(committer.commit(report(n, bad=n == 2)) for n in range(1, 4)), return_exceptions=True
    )
    assert isinstance(outcomes[1], InvalidArgument)
    assert [o.version for o in outcomes if isinstance(o, TwinView)] == [1, 3]
    assert database.committed == [1, 3]


async def test_a_failed_transaction_is_retried_report_by_report() -> None:
    database = FakeDatabase()
    committer = ReportCommitter(FeedNotifier(), commit_group=database.commit)
    outcomes = await asyncio.gather(
        *(committer.commit(report(n, **({"poison": 1} if n == 3 else {}))) for n in (1, 2, 3, 4)),
        return_exceptions=True,
    )
    assert isinstance(outcomes[2], RuntimeError)
    assert database.committed == [1, 2, 4]
    assert database.groups == [[1, 2, 3, 4], [1], [2], [3], [4]]


async def test_a_caller_that_goes_away_leaves_its_report_committed() -> None:
    database = FakeDatabase()
    committer = ReportCommitter(FeedNotifier(), commit_group=database.commit)
    database.release.clear()
    caller = asyncio.create_task(committer.commit(report(1)))
    await asyncio.sleep(0)
    caller.cancel()
    database.release.set()
    await committer.close()
    assert database.committed == [1]


async def test_stopping_the_committer_answers_everyone() -> None:
    database = FakeDatabase()
    committer = ReportCommitter(FeedNotifier(), commit_group=database.commit)
    database.release.clear()
    waiting = [asyncio.create_task(committer.commit(report(n))) for n in (1, 2)]
    await asyncio.sleep(0)
    assert committer._worker is not None
    committer._worker.cancel()
    outcomes = await asyncio.gather(*waiting, return_exceptions=True)
    assert all(isinstance(o, asyncio.CancelledError) for o in outcomes)
    # A later report starts afresh.
    database.release.set()
    assert (await committer.commit(report(3))).version == 3


async def test_many_devices_reporting_at_once_each_get_their_own_outcome(site: Site) -> None:
    """Reports of many devices, several in flight per device and some refused, committed
    together: each device ends with what its own valid reports said, one twin version per
    valid report, and nothing of the refused ones. (Reports a device sends without waiting
    for the answers may be applied in any order, as CoAP promises none; these touch
    different properties.)"""
    devices = [await enrolled_device(site) for _ in range(8)]
    uri = site.coaps + "/twin/reported"
    bodies: list[tuple[dict[str, object], Code]] = [
        ({"brightness": 10}, Code.CHANGED),
        ({"brightness": 500}, Code.UNPROCESSABLE_ENTITY),  # outside the profile's 0-100
        ({"power": True}, Code.CHANGED),
        ({"no_such_property": 1}, Code.UNPROCESSABLE_ENTITY),
        ({"fault_codes": ["E1"]}, Code.CHANGED),
    ]

    async def device(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> list[Code]:
        async with coap_client(site.trust, cert, key) as coap:
            responses = await asyncio.gather(
                *(
                    request(coap, uri, aiocoap.POST, cbor2.dumps(body), content_format=CBOR)
                    for body, _ in bodies
                )
            )
        return [r.code for r in responses]

    before = {device_id: twin_of(site, device_id).version for device_id, _, _ in devices}
    answers = await asyncio.gather(*(device(cert, key) for _, cert, key in devices))
    for (device_id, _, _), codes in zip(devices, answers, strict=True):
        assert codes == [code for _, code in bodies]
        twin = twin_of(site, device_id)
        assert json_format.MessageToDict(twin.reported) == {
            "brightness": 10,
            "power": True,
            "fault_codes": ["E1"],
        }
        assert twin.version == before[device_id] + 3


async def test_an_older_telemetry_pack_does_not_overwrite_newer_values(site: Site) -> None:
    """A pack held back in a sensor's queue arrives after a newer one: its samples join the
    history, but the reported state keeps the newer values; a measurement the late pack has
    newer news of is still taken."""
    device_id, cert, key = await enrolled_device(site, "env-sensor", d.SENSOR)
    now = time.time()
    newer = [{"bt": now - 60, "n": "noise_db", "u": "dB", "v": 50.0}]
    older = [
        {"bt": now - 600, "n": "noise_db", "u": "dB", "v": 70.0},
        {"n": "pm2_5", "u": "ug/m3", "v": 9, "t": 590},  # 10 s ago: newer than anything stored
    ]
    async with coap_client(site.trust, cert, key) as coap:
        uri = site.coaps + "/twin/telemetry"
        for pack in (newer, older):
            answer = await request(
                coap, uri, aiocoap.POST, json.dumps(pack).encode(), content_format=SENML_JSON
            )
            assert answer.code == Code.CHANGED, answer.payload
    twin = twin_of(site, device_id)
    assert json_format.MessageToDict(twin.reported) == {"noise_db": 50.0, "pm2_5": 9}
    # The values' times are when they were measured, not when they arrived.
    stamps = json_format.MessageToDict(twin.reported_metadata)
    assert datetime.fromisoformat(stamps["noise_db"]) == datetime.fromtimestamp(
        int((now - 60) * 1000) / 1000, UTC
    )
    # A plain report always wins: it is the device's state as of now.
    async with coap_client(site.trust, cert, key) as coap:
        answer = await request(
            coap,
            site.coaps + "/twin/reported",
            aiocoap.POST,
            cbor2.dumps({"noise_db": 40.0}),
            content_format=CBOR,
        )
        assert answer.code == Code.CHANGED
    assert json_format.MessageToDict(twin_of(site, device_id).reported)["noise_db"] == 40.0
