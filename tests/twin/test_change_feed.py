"""The change feed through WatchTwins: order, filtering, resuming after restarts, and two
server processes sharing one PostgreSQL."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from citytwin.v1 import devices_pb2 as d
from citytwin.v1 import twins_pb2 as t
from tests.conftest import Api, Database, Deployment, Server, run_cli, unique
from tests.twin.test_twins_api import desired


class Watch:
    """A WatchTwins stream consumed on a thread, so tests can wait for events with a bound.
    Sync-status events are left out unless `with_sync`: these tests are about the order and
    completeness of the feed, which sync-status changes interleave with."""

    def __init__(
        self, api: Api, selector: str = "", after: str = "", *, with_sync: bool = False
    ) -> None:
        self.with_sync = with_sync
        self.events: queue.Queue[Any] = queue.Queue()
        self.call = api.twins.WatchTwins(
            t.WatchTwinsRequest(filter=selector, after_cursor=after), metadata=api.metadata
        )
        self.thread = threading.Thread(target=self._pump, daemon=True)
        self.thread.start()

    def _pump(self) -> None:
        try:
            for event in self.call:
                if self.with_sync or event.type != t.SYNC_STATUS_CHANGED:
                    self.events.put(event)
        except grpc.RpcError as error:
            self.events.put(error)

    def take(self, count: int, timeout: float = 15.0) -> list[t.ChangeEvent]:
        out = []
        for _ in range(count):
            item = self.events.get(timeout=timeout)
            if isinstance(item, grpc.RpcError):
                raise item
            out.append(item)
        return out

    def assert_quiet(self, seconds: float = 0.5) -> None:
        with pytest.raises(queue.Empty):
            self.events.get(timeout=seconds)

    def close(self) -> None:
        self.call.cancel()
        self.thread.join(timeout=5)


def _admin_api(db: Database, server: Server, channel: grpc.Channel) -> Api:
    token = run_cli(db, "token", "create", "--role", "admin").stdout.strip()
    return Api(channel, token)


def _create(api: Api, device_id: str, **labels: str) -> None:
    api.call(
        api.devices.CreateDevice,
        d.CreateDeviceRequest(
            device_id=device_id,
            device=d.Device(
                kind=d.LAMP, model="lamp-led-dimmable", serial_number=unique("sn"), labels=labels
            ),
        ),
    )


@pytest.fixture
def server(fresh_db: Database) -> Iterator[Server]:
    srv = Server(fresh_db).start()
    yield srv
    srv.stop()


def test_events_in_commit_order_filtered_by_selector(fresh_db: Database, server: Server) -> None:
    with grpc.insecure_channel(server.address) as channel:
        api = _admin_api(fresh_db, server, channel)
        # Fresh database: "0" (from the oldest) avoids racing the stream's start.
        north = Watch(api, "district=north", after="0")
        everything = Watch(api, after="0")
        _create(api, "n1", district="north")
        _create(api, "s1", district="south")
        desired(api, "devices/n1", {"brightness": 40})
        desired(api, "devices/s1", {"brightness": 10})
        events = north.take(2)
        assert [(e.device_name, e.type) for e in events] == [
            ("devices/n1", t.DEVICE_CREATED),
            ("devices/n1", t.DESIRED_UPDATED),
        ]
        assert events[0].device.labels["district"] == "north"
        assert events[1].twin_version == 1
        assert dict(events[1].patch.fields)["brightness"].number_value == 40
        north.assert_quiet()
        all_events = everything.take(4)
        cursors = [int(e.cursor) for e in all_events]
        assert cursors == sorted(cursors) and len(set(cursors)) == 4
        # Watching again from "0" replays the same feed.
        replay = Watch(api, after="0")
        assert [e.cursor for e in replay.take(4)] == [e.cursor for e in all_events]
        for watch in (north, everything, replay):
            watch.close()


def test_watch_rejects_bad_filters_and_cursors(deployment: Deployment) -> None:
    # Refused whatever the feed holds: the shared server will do.
    api = deployment.api("admin")
    for selector, after in (("reported.brightness>5", ""), ("kind=", ""), ("", "abc")):
        watch = Watch(api, selector, after)
        with pytest.raises(grpc.RpcError) as info:
            watch.take(1)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        watch.close()


def test_resume_after_restart_without_gap_or_duplicate(fresh_db: Database) -> None:
    first = Server(fresh_db).start()
    with grpc.insecure_channel(first.address) as channel:
        api = _admin_api(fresh_db, first, channel)
        watch = Watch(api, after="0")
        _create(api, "r1")
        for level in range(1, 6):
            desired(api, "devices/r1", {"brightness": level})
        seen = watch.take(6)
        watch.close()
    # The watcher processed 3 events before the server went away for good.
    cursor = seen[2].cursor
    first.kill()
    second = Server(fresh_db).start()
    try:
        with grpc.insecure_channel(second.address) as channel:
            api = Api(channel, api.metadata[0][1].removeprefix("Bearer "))
            for level in range(6, 9):
                desired(api, "devices/r1", {"brightness": level})
            resumed = Watch(api, after=cursor)
            rest = resumed.take(6)
            resumed.assert_quiet()
            resumed.close()
    finally:
        second.stop()
    versions = [e.twin_version for e in rest]
    assert versions == [3, 4, 5, 6, 7, 8]
    assert [e.cursor for e in rest[:3]] == [e.cursor for e in seen[3:]]


def test_trimmed_cursor_is_out_of_range(fresh_db: Database) -> None:
    srv = Server(fresh_db, extra_env={"CITYTWIN_FEED_RETENTION": "0"}).start()
    try:
        with grpc.insecure_channel(srv.address) as channel:
            api = _admin_api(fresh_db, srv, channel)
            _create(api, "t1")
            desired(api, "devices/t1", {"brightness": 1})
            desired(api, "devices/t1", {"brightness": 2})
    finally:
        srv.stop()
    # A restart trims at once with a retention of 0 s, keeping only the newest entry.
    srv = Server(fresh_db, extra_env={"CITYTWIN_FEED_RETENTION": "0"}).start()
    try:
        with grpc.insecure_channel(srv.address) as channel:
            api = Api(channel, api.metadata[0][1].removeprefix("Bearer "))
            watch = Watch(api, after="1")
            with pytest.raises(grpc.RpcError) as info:
                watch.take(1)
            assert info.value.code() == grpc.StatusCode.OUT_OF_RANGE
            watch.close()
    finally:
        srv.stop()


def test_two_processes_share_one_postgres(backend: str, fresh_db: Database) -> None:
    if backend != "postgres":
        pytest.skip("replicas share a database only on PostgreSQL")
    one, two = Server(fresh_db).start(), Server(fresh_db).start()
    try:
        with grpc.insecure_channel(one.address) as c1, grpc.insecure_channel(two.address) as c2:
            api1 = _admin_api(fresh_db, one, c1)
            api2 = Api(c2, api1.metadata[0][1].removeprefix("Bearer "))
            watch = Watch(api2, "district=east", after="0")
            _create(api1, "e1", district="east")
            desired(api1, "devices/e1", {"brightness": 33})
            events = watch.take(2, timeout=10)
            assert [e.type for e in events] == [t.DEVICE_CREATED, t.DESIRED_UPDATED]
            # And the other way round, with concurrent writers on both replicas.
            back = Watch(api1, "district=east", after=events[-1].cursor)
            threads = [
                threading.Thread(
                    target=lambda a=a, n=n: [
                        desired(a, "devices/e1", {"brightness": n * 10 + i}) for i in range(5)
                    ]
                )
                for n, a in ((1, api1), (2, api2))
            ]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            got = back.take(10, timeout=10)
            assert [e.twin_version for e in got] == list(range(2, 12))
            back.assert_quiet()
            watch.close()
            back.close()
    finally:
        one.stop()
        two.stop()


def test_live_watch_sees_every_concurrent_change_once(fresh_db: Database, server: Server) -> None:
    """Concurrent writers on many devices: what a live watcher saw equals a later replay, in
    the same order, with nothing skipped (on PostgreSQL this needs the ordered append)."""
    with grpc.insecure_channel(server.address) as channel:
        api = _admin_api(fresh_db, server, channel)
        for i in range(8):
            _create(api, f"c{i}")
        live = Watch(api, after="0")

        def writer(i: int) -> None:
            for level in range(25):
                desired(api, f"devices/c{i}", {"brightness": level + 1})

        threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        seen = live.take(8 + 8 * 25)
        live.assert_quiet()
        live.close()
        replay = Watch(api, after="0")
        assert [e.cursor for e in replay.take(len(seen))] == [e.cursor for e in seen]
        replay.close()
        per_device: dict[str, list[int]] = {}
        for event in seen:
            if event.type == t.DESIRED_UPDATED:
                per_device.setdefault(event.device_name, []).append(event.twin_version)
        assert all(v == list(range(1, 26)) for v in per_device.values()) and len(per_device) == 8
