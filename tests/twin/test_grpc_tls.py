"""The gRPC port over TLS, with a certificate the service's own CA issued
(`citytwin ca issue-server-cert`), given to the server as files."""

from __future__ import annotations

import stat
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from citytwin.v1 import profiles_pb2 as p
from tests.conftest import Api, Database, Server, run_cli


def service_issued_tls(db: Database, directory: Path) -> tuple[Path, Path, Path]:
    """(certificate chain, key, CA chain to trust) for 127.0.0.1/localhost, from the fleet CA."""
    cert, key, trust = directory / "server.crt", directory / "server.key", directory / "ca.pem"
    run_cli(
        db,
        *("ca", "issue-server-cert", "--name", "localhost", "--name", "127.0.0.1"),
        *("--cert-out", str(cert), "--key-out", str(key), "--days", "2"),
    )
    trust.write_text(run_cli(db, "ca", "show", "--pem").stdout)
    return cert, key, trust


def test_issued_server_certificate(fresh_db: Database, tmp_path: Path) -> None:
    cert, key, trust = service_issued_tls(fresh_db, tmp_path)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    leaf, issuing = x509.load_pem_x509_certificates(cert.read_bytes())
    leaf.verify_directly_issued_by(issuing)
    assert issuing in x509.load_pem_x509_certificates(trust.read_bytes())
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert 1 < (leaf.not_valid_after_utc - leaf.not_valid_before_utc).days <= 2
    bad = run_cli(
        fresh_db,
        *("ca", "issue-server-cert", "--name", "not a host!", "--cert-out", "x", "--key-out", "y"),
        check=False,
    )
    assert bad.returncode == 2 and "not a valid DNS name" in bad.stderr


def test_tls_port(fresh_db: Database, tmp_path: Path) -> None:
    cert, key, trust = service_issued_tls(fresh_db, tmp_path)
    token = run_cli(fresh_db, "token", "create", "--role", "viewer").stdout.strip()
    server = Server(
        fresh_db,
        extra_env={"CITYTWIN_TLS_CERT": str(cert), "CITYTWIN_TLS_KEY": str(key)},
        tls_root=trust.read_bytes(),
    ).start()
    try:
        credentials = grpc.ssl_channel_credentials(root_certificates=trust.read_bytes())
        with grpc.secure_channel(server.address, credentials) as channel:
            api = Api(channel, token)
            listed = api.call(api.profiles.ListProfiles, p.ListProfilesRequest())
            assert any(x.model == "lamp-led-dimmable" for x in listed.profiles)
        # A plaintext client cannot talk to the TLS port.
        with grpc.insecure_channel(server.address) as channel:
            api = Api(channel, token)
            with pytest.raises(grpc.RpcError) as info:
                api.call(api.profiles.ListProfiles, p.ListProfilesRequest(), timeout=3)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop()
