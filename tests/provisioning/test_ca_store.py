"""The fleet CA's storage through real server processes: created once, shared, importable."""

from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from provisioning.certificate_authority import create_fleet_ca, encrypt_private_key
from tests.conftest import Database, Server, run_cli


def ca_show(db: Database) -> dict[str, str]:
    return dict(json.loads(run_cli(db, "ca", "show", "--json").stdout))


def test_created_on_first_start_and_kept_across_restarts(fresh_db: Database) -> None:
    missing = run_cli(fresh_db, "ca", "show", check=False)
    assert missing.returncode == 2 and "no fleet CA yet" in missing.stderr
    server = Server(fresh_db).start()
    server.stop()
    first = ca_show(fresh_db)
    assert first["source"] == "generated" and "Issuing CA" in first["issuing"]
    key_file = fresh_db.home / "ca-passphrase"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    Server(fresh_db).start().stop()
    assert ca_show(fresh_db) == first
    pem = run_cli(fresh_db, "ca", "show", "--pem").stdout
    assert pem.count("BEGIN CERTIFICATE") == 2


def test_wrong_passphrase_refuses_to_start(fresh_db: Database) -> None:
    Server(fresh_db, extra_env={"CITYTWIN_CA_PASSPHRASE": "right one"}).start().stop()
    server = Server(fresh_db, extra_env={"CITYTWIN_CA_PASSPHRASE": "wrong one"})
    with pytest.raises(AssertionError):
        server.start()
    assert "cannot open the fleet CA key" in server.log_text()


def test_replicas_starting_together_share_one_ca(backend: str, fresh_db: Database) -> None:
    if backend != "postgres":
        pytest.skip("replicas share a database only on PostgreSQL")
    env = {"CITYTWIN_CA_PASSPHRASE": "shared secret"}
    servers = [Server(fresh_db, extra_env=env) for _ in range(3)]
    errors: list[BaseException] = []

    def start(server: Server) -> None:
        try:
            server.start()
        except BaseException as error:  # reported below, with the server's log
            errors.append(error)

    threads = [threading.Thread(target=start, args=(s,)) for s in servers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for server in servers:
        server.stop()
    assert not errors, [s.log_text() for s in servers]
    assert ca_show(fresh_db)["source"] == "generated"


def test_import_an_existing_ca(fresh_db: Database, tmp_path: Path) -> None:
    ca, _root_key = create_fleet_ca("Example City")
    files = {
        "root": ca.root_cert.public_bytes(serialization.Encoding.PEM),
        "issuing": ca.issuing_cert.public_bytes(serialization.Encoding.PEM),
        "key": encrypt_private_key(ca.issuing_key, b"operator secret"),
    }
    for name, data in files.items():
        (tmp_path / f"{name}.pem").write_bytes(data)
    args = [
        "ca", "import",
        "--root", str(tmp_path / "root.pem"),
        "--issuing", str(tmp_path / "issuing.pem"),
        "--key", str(tmp_path / "key.pem"),
    ]  # fmt: skip
    wrong = run_cli(fresh_db, *args, check=False)
    assert wrong.returncode == 2 and "passphrase" in wrong.stderr
    os.environ["CITYTWIN_IMPORT_KEY_PASSPHRASE"] = "operator secret"
    try:
        assert "imported" in run_cli(fresh_db, *args).stdout
        again = run_cli(fresh_db, *args, check=False)
    finally:
        del os.environ["CITYTWIN_IMPORT_KEY_PASSPHRASE"]
    assert again.returncode == 2 and "exists already" in again.stderr
    Server(fresh_db).start().stop()
    shown = ca_show(fresh_db)
    assert shown["source"] == "imported" and "Example City" in shown["issuing"]
