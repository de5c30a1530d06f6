"""What callers see when the database goes away under a running server."""

from __future__ import annotations

import grpc
import pytest

from citytwin.v1 import devices_pb2 as d
from tests.conftest import Api, Database, Server, run_cli


def test_lost_database_is_unavailable_not_a_leak(backend: str, fresh_db: Database) -> None:
    if backend != "postgres":
        pytest.skip("needs a database that can be dropped under the server")
    token = run_cli(fresh_db, "token", "create", "--role", "admin").stdout.strip()
    server = Server(fresh_db).start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            api = Api(channel, token)
            api.call(api.devices.ListDevices, d.ListDevicesRequest())
            fresh_db.drop()
            with pytest.raises(grpc.RpcError) as info:
                api.call(api.devices.ListDevices, d.ListDevicesRequest())
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "asyncpg" not in info.value.details()
    finally:
        server.stop()
    assert '"database unavailable"' in server.log_text()
