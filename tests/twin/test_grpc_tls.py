"""The gRPC port over TLS, with the certificate and key given as files."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from citytwin.v1 import profiles_pb2 as p
from tests.conftest import Api, Database, Server, run_cli


def self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "server.crt", directory / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_tls_port(fresh_db: Database, tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    token = run_cli(fresh_db, "token", "create", "--role", "viewer").stdout.strip()
    server = Server(
        fresh_db,
        extra_env={"CITYTWIN_TLS_CERT": str(cert), "CITYTWIN_TLS_KEY": str(key)},
        tls_root=cert.read_bytes(),
    ).start()
    try:
        credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
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
