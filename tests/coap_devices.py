"""Test devices: keys, CSRs and aiocoap clients that speak to the server as a device would,
over UDP and over TLS (`coaps+tcp`) with or without a client certificate."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import aiocoap
from aiocoap.numbers.codes import Code
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from google.protobuf import json_format
from google.protobuf.struct_pb2 import Struct

from citytwin.v1 import devices_pb2 as d
from citytwin.v1 import provisioning_pb2 as p
from citytwin.v1 import twins_pb2 as t
from tests.conftest import Api, Database, Server, run_cli, unique
from twin.coap_tls import client_ssl_context, device_client_context
from twin.simulator.devices import key_pem, make_csr
from twin.simulator.devices import new_device_key as new_key

PKCS7 = 281
PKCS10 = 286
PKIX_CERT = 287


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass
class Manufacturer:
    """A factory CA that signs factory (IDevID-like) certificates carrying serial numbers."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def create(cls, name: str) -> Manufacturer:
        key = new_key()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.now(UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    def factory_certificate(
        self, serial: str
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = new_key()
        now = datetime.now(UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.COMMON_NAME, f"factory {serial}"),
                        x509.NameAttribute(NameOID.SERIAL_NUMBER, serial),
                    ]
                )
            )
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        return cert, key


@contextlib.asynccontextmanager
async def coap_client(
    trust_pem: bytes | None = None,
    cert: x509.Certificate | None = None,
    key: ec.EllipticCurvePrivateKey | None = None,
) -> AsyncIterator[aiocoap.Context]:
    """A client context: UDP always; coaps+tcp trusting `trust_pem`, presenting `cert`."""
    if trust_pem is None:
        context = await aiocoap.Context.create_client_context(transports=["udp6"])
    else:
        tls = client_ssl_context(
            trust_pem,
            cert_pem=pem(cert) if cert is not None else None,
            key_pem=key_pem(key) if key is not None else None,
        )
        context = await device_client_context(tls)
    try:
        yield context
    finally:
        await context.shutdown()


async def request(
    context: aiocoap.Context,
    uri: str,
    code: aiocoap.numbers.codes.Code = aiocoap.GET,
    payload: bytes = b"",
    **options: object,
) -> aiocoap.Message:
    """Send one request and wait (up to 15 s) for its final response."""
    message = aiocoap.Message(code=code, uri=uri, payload=payload)
    for name, value in options.items():
        setattr(message.opt, name, value)
    response: aiocoap.Message = await asyncio.wait_for(context.request(message).response, 15)
    return response


async def read_tcp_frame(reader: asyncio.StreamReader) -> tuple[int, bytes, bytes]:
    """The next message on a `coap+tcp` stream, read by hand (RFC 8323 section 3.2 framing):
    (code, token, options and payload)."""
    first = (await reader.readexactly(1))[0]
    length, token_length = first >> 4, first & 0x0F
    if length >= 13:
        extra = {13: 1, 14: 2, 15: 4}[length]
        base = {13: 13, 14: 269, 15: 65805}[length]
        length = int.from_bytes(await reader.readexactly(extra), "big") + base
    code = (await reader.readexactly(1))[0]
    token = await reader.readexactly(token_length)
    return code, token, await reader.readexactly(length)


def certificate(response: aiocoap.Message) -> x509.Certificate:
    """The certificate in an EST answer (certs-only PKCS#7 or a DER certificate)."""
    from cryptography.hazmat.primitives.serialization import pkcs7

    if response.opt.content_format == PKIX_CERT:
        return x509.load_der_x509_certificate(response.payload)
    (cert,) = pkcs7.load_der_pkcs7_certificates(response.payload)
    return cert


@dataclass
class Site:
    """A running server as a device sees it, plus an admin API."""

    server: Server
    api: Api
    trust: bytes  # the fleet CA's certificates, PEM

    @property
    def coaps(self) -> str:
        return f"coaps+tcp://127.0.0.1:{self.server.coaps_port}"

    @property
    def coap(self) -> str:
        return f"coap://127.0.0.1:{self.server.coap_port}"

    def enroll_code(
        self,
        serial: str,
        district: str = "north",
        model: str = "lamp-led-dimmable",
        kind: d.DeviceKind.ValueType = d.LAMP,
    ) -> tuple[str, str]:
        """Register a device (a lamp by default) with an enrollment; (device id, code)."""
        response = self.api.call(
            self.api.provisioning.CreateEnrollment,
            p.CreateEnrollmentRequest(
                device=d.Device(
                    kind=kind,
                    model=model,
                    serial_number=serial,
                    labels={"district": district},
                )
            ),
        )
        return response.device.name.removeprefix("devices/"), response.enrollment_code

    def device(self, device_id: str) -> d.Device:
        device: d.Device = self.api.call(
            self.api.devices.GetDevice, d.GetDeviceRequest(name=f"devices/{device_id}")
        )
        return device

    def certificates(self, device_id: str) -> list[p.Certificate]:
        return list(
            self.api.call(
                self.api.provisioning.ListCertificates,
                p.ListCertificatesRequest(device=f"devices/{device_id}"),
            ).certificates
        )

    def audit(self, device_id: str = "") -> list[p.AuditEvent]:
        device = f"devices/{device_id}" if device_id else ""
        return list(
            self.api.call(
                self.api.provisioning.ListAuditEvents, p.ListAuditEventsRequest(device=device)
            ).events
        )


def fleet_trust(db: Database) -> bytes:
    return run_cli(db, "ca", "show", "--pem").stdout.encode()


async def post_csr(
    context: aiocoap.Context, uri: str, csr: bytes, **options: object
) -> aiocoap.Message:
    options.setdefault("content_format", PKCS10)
    return await request(context, uri, aiocoap.POST, csr, **options)


async def enrolled_device(
    site: Site, model: str = "lamp-led-dimmable", kind: d.DeviceKind.ValueType = d.LAMP
) -> tuple[str, x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A device registered, enrolled with a code over coaps+tcp: (id, certificate, key)."""
    serial = unique("SN")
    device_id, code = site.enroll_code(serial, model=model, kind=kind)
    key = new_key()
    async with coap_client(site.trust) as tls:
        response = await post_csr(tls, site.coaps + "/est/sen", make_csr(key, serial, code))
    assert response.code == Code.CHANGED
    return device_id, certificate(response), key


def twin_of(site: Site, device_id: str) -> t.Twin:
    """The device's twin, read through gRPC."""
    twin: t.Twin = site.api.call(
        site.api.twins.GetTwin, t.GetTwinRequest(name=f"devices/{device_id}/twin")
    )
    return twin


def set_desired(api: Api, device_id: str, patch: dict[str, object]) -> t.Twin:
    """Apply a desired-state merge patch through gRPC."""
    twin: t.Twin = api.call(
        api.twins.UpdateDesired,
        t.UpdateDesiredRequest(
            name=f"devices/{device_id}/twin", patch=json_format.ParseDict(patch, Struct())
        ),
    )
    return twin
