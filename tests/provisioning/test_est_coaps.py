"""EST-coaps (RFC 9148) against a real server, with real aiocoap clients on loopback: CA
certificates, enrollment with a code or a factory certificate, re-enrollment, revocation,
bad input, block-wise transfers and throttling."""

from __future__ import annotations

import asyncio
import ssl

import aiocoap
import pytest
from aiocoap.numbers.codes import Code
from aiocoap.optiontypes import BlockOption
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from google.protobuf.field_mask_pb2 import FieldMask

from citytwin.v1 import devices_pb2 as d
from citytwin.v1 import provisioning_pb2 as p
from tests.coap_devices import (
    PKCS7,
    PKCS10,
    PKIX_CERT,
    Manufacturer,
    Site,
    certificate,
    coap_client,
    enrolled_device,
    make_csr,
    new_key,
    pem,
    post_csr,
    request,
)
from tests.conftest import unique

# --- CA certificates and discovery ------------------------------------------------------


async def test_crts_gives_the_ca_chain_over_udp_and_tls(site: Site) -> None:
    async with coap_client() as udp, coap_client(site.trust) as tls:
        for context, base in ((udp, site.coap), (tls, site.coaps)):
            for path in ("/.well-known/est/crts", "/est/crts"):
                response = await request(context, base + path)
                assert response.code == Code.CONTENT
                assert response.opt.content_format == PKCS7
                # A certs-only PKCS#7 is a DER SET: its order means nothing.
                chain = pkcs7.load_der_pkcs7_certificates(response.payload)
                (root,) = [c for c in chain if c.subject == c.issuer]
                (issuing,) = [c for c in chain if c.subject != c.issuer]
                assert pem(root) in site.trust and pem(issuing) in site.trust
        single = await request(tls, site.coaps + "/est/crts", accept=PKIX_CERT)
        assert single.opt.content_format == PKIX_CERT
        assert x509.load_der_x509_certificate(single.payload) == issuing
        refused = await request(tls, site.coaps + "/est/crts", accept=50)
        assert refused.code == Code.NOT_ACCEPTABLE
        assert b"287" in refused.payload


async def test_crts_in_small_blocks(site: Site) -> None:
    async with coap_client() as udp:
        whole = await request(udp, site.coap + "/est/crts")
        # Ask for 64-byte blocks; the client library fetches the rest block by block.
        blocked = await request(
            udp, site.coap + "/est/crts", block2=BlockOption.BlockwiseTuple(0, False, 2)
        )
        assert blocked.payload == whole.payload


async def test_discovery_lists_est_resources_with_types_and_formats(site: Site) -> None:
    async with coap_client() as udp:
        response = await request(udp, site.coap + "/.well-known/core", uri_query=["rt=ace.est*"])
    links = response.payload.decode()
    for resource in ("crts", "sen", "sren"):
        for base in ("/.well-known/est/", "/est/"):
            assert f'<{base}{resource}>;ct="281 287";rt="ace.est.{resource}"' in links
    assert "core" not in links.replace(".well-known/est", "")


# --- enrollment with a code ---------------------------------------------------------------


async def test_enrollment_with_a_code_issues_a_bound_certificate(site: Site) -> None:
    serial = unique("SN")
    device_id, code = site.enroll_code(serial)
    key = new_key()
    async with coap_client(site.trust) as tls:
        response = await post_csr(
            tls, site.coaps + "/.well-known/est/sen", make_csr(key, serial, code.lower())
        )
    assert response.code == Code.CHANGED, response.payload
    assert response.opt.content_format == PKCS7
    cert = certificate(response)
    assert cert.public_key() == key.public_key()
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == device_id
    assert cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)[0].value == serial
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        f"urn:citytwin:device:{device_id}"
    ]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert cert.serial_number.bit_length() > 100
    issuing = x509.load_pem_x509_certificates(site.trust)[0]
    cert.verify_directly_issued_by(issuing)
    assert site.device(device_id).state == d.PROVISIONED
    (issued,) = site.certificates(device_id)
    assert issued.state == p.VALID
    assert issued.authorization == "enrollment-code"
    assert issued.name == f"certificates/{cert.serial_number:x}"
    enrollments = site.api.call(
        site.api.provisioning.ListEnrollments,
        p.ListEnrollmentsRequest(device=f"devices/{device_id}"),
    ).enrollments
    assert [e.state for e in enrollments] == [p.USED]
    actions = [(e.action, e.success) for e in site.audit(device_id)]
    assert actions[0] == ("enroll", True)


async def test_enrollment_answers_a_der_certificate_on_request(site: Site) -> None:
    serial = unique("SN")
    _, code = site.enroll_code(serial)
    async with coap_client(site.trust) as tls:
        response = await post_csr(
            tls, site.coaps + "/est/sen", make_csr(new_key(), serial, code), accept=PKIX_CERT
        )
    assert response.code == Code.CHANGED
    assert response.opt.content_format == PKIX_CERT
    x509.load_der_x509_certificate(response.payload)


async def test_refused_codes_change_nothing(site: Site) -> None:
    serial = unique("SN")
    device_id, code = site.enroll_code(serial)
    other_serial = unique("SN")
    _, other_code = site.enroll_code(other_serial)
    cancelled_serial = unique("SN")
    cancelled_id, cancelled_code = site.enroll_code(cancelled_serial)
    enrollment = site.api.call(
        site.api.provisioning.ListEnrollments,
        p.ListEnrollmentsRequest(device=f"devices/{cancelled_id}"),
    ).enrollments[0]
    site.api.call(
        site.api.provisioning.CancelEnrollment, p.CancelEnrollmentRequest(name=enrollment.name)
    )
    wrong = "0000-0000-0000-0000"
    async with coap_client(site.trust) as tls:
        for csr, words in (
            (make_csr(new_key(), serial, wrong), "not valid"),
            # A code only works for the serial it was created for.
            (make_csr(new_key(), serial, other_code), "not valid"),
            (make_csr(new_key(), unique("SN"), code), "not valid"),
            (make_csr(new_key(), cancelled_serial, cancelled_code), "cancelled"),
            (make_csr(new_key(), serial, "not a code at all"), "not valid"),
        ):
            response = await post_csr(tls, site.coaps + "/est/sen", csr)
            assert response.code == Code.FORBIDDEN, response.payload
            assert words in response.payload.decode()
        assert site.device(device_id).state == d.REGISTERED
        assert site.certificates(device_id) == []
        # The right code still works after the failures, once.
        ok = await post_csr(tls, site.coaps + "/est/sen", make_csr(new_key(), serial, code))
        assert ok.code == Code.CHANGED
        again = await post_csr(tls, site.coaps + "/est/sen", make_csr(new_key(), serial, code))
        assert again.code == Code.FORBIDDEN
        assert "used" in again.payload.decode()
    assert len(site.certificates(device_id)) == 1
    failures = [e for e in site.audit(device_id) if not e.success]
    assert failures and all(e.action == "enroll" for e in failures)


async def test_malformed_requests_get_the_right_error(site: Site) -> None:
    serial = unique("SN")
    device_id, code = site.enroll_code(serial)
    good = make_csr(new_key(), serial, code)
    tampered = good[:-3] + bytes([good[-3] ^ 0xFF]) + good[-2:]
    weak_key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    weak = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.SERIAL_NUMBER, serial)]))
        .sign(weak_key, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )
    async with coap_client(site.trust) as tls:
        sen = site.coaps + "/est/sen"
        cases: list[tuple[aiocoap.Message, Code, str]] = [
            (await post_csr(tls, sen, b"garbage"), Code.BAD_REQUEST, "PKCS#10"),
            (await post_csr(tls, sen, tampered), Code.BAD_REQUEST, "signature"),
            (await post_csr(tls, sen, weak), Code.BAD_REQUEST, "RSA"),
            (
                await post_csr(tls, sen, make_csr(new_key(), None, code)),
                Code.BAD_REQUEST,
                "serialNumber",
            ),
            (
                await post_csr(tls, sen, good, content_format=0),
                Code.UNSUPPORTED_CONTENT_FORMAT,
                "286",
            ),
            (await post_csr(tls, sen, good, accept=50), Code.NOT_ACCEPTABLE, "281"),
            (await post_csr(tls, sen, b"x" * 9000), Code.REQUEST_ENTITY_TOO_LARGE, "8192"),
            (await request(tls, sen), Code.METHOD_NOT_ALLOWED, ""),
        ]
    for response, expected, words in cases:
        assert response.code == expected, (response, response.payload)
        assert words in response.payload.decode(errors="replace")
    assert site.device(device_id).state == d.REGISTERED
    assert site.certificates(device_id) == []


async def test_large_csr_block_wise_and_the_reassembly_cap(site: Site) -> None:
    serial = unique("SN")
    device_id, code = site.enroll_code(serial)
    big_key = rsa.generate_private_key(public_exponent=65537, key_size=4096)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.COMMON_NAME, "x" * 60),
                    x509.NameAttribute(NameOID.SERIAL_NUMBER, serial),
                ]
            )
        )
        .add_attribute(x509.oid.AttributeOID.CHALLENGE_PASSWORD, code.encode())
        .sign(big_key, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )
    assert len(csr) > 1024
    async with coap_client(site.trust) as tls:
        uri = site.coaps + "/est/sen"
        response = await send_block_wise(tls, uri, csr, size_exponent=6)  # 1024-byte blocks
        assert response.code == Code.CHANGED, response.payload
        assert certificate(response).public_key() == big_key.public_key()
        # 20 KiB announced in blocks: refused at the block that crosses the 8 KiB limit.
        refused = await send_block_wise(tls, uri, b"\0" * 20 * 1024, size_exponent=6)
        assert refused.code == Code.REQUEST_ENTITY_TOO_LARGE
        assert refused.opt.size1 == 8192
    assert len(site.certificates(device_id)) == 1


async def send_block_wise(
    context: aiocoap.Context, uri: str, payload: bytes, size_exponent: int
) -> aiocoap.Message:
    """POST `payload` in Block1 blocks by hand; the last response (or the first refusal)."""
    size = 2 ** (size_exponent + 4)
    blocks = [payload[i : i + size] for i in range(0, len(payload), size)]
    response: aiocoap.Message | None = None
    for number, block in enumerate(blocks):
        message = aiocoap.Message(code=aiocoap.POST, uri=uri, payload=block)
        message.opt.content_format = PKCS10
        message.opt.block1 = BlockOption.BlockwiseTuple(
            number, number < len(blocks) - 1, size_exponent
        )
        response = await context.request(message, handle_blockwise=False).response
        if not response.code.is_successful():
            return response
    assert response is not None
    return response


async def test_plain_coap_enrollment_is_off_by_default(site: Site) -> None:
    serial = unique("SN")
    device_id, code = site.enroll_code(serial)
    async with coap_client() as udp:
        response = await post_csr(udp, site.coap + "/est/sen", make_csr(new_key(), serial, code))
    assert response.code == Code.FORBIDDEN
    assert b"coaps+tcp" in response.payload
    assert site.device(device_id).state == d.REGISTERED


@pytest.mark.server_env({"CITYTWIN_ALLOW_COAP_ENROLLMENT": "1"})
async def test_plain_coap_enrollment_behind_its_setting(own_site: Site) -> None:
    serial = unique("SN")
    device_id, code = own_site.enroll_code(serial)
    async with coap_client() as udp:
        response = await post_csr(
            udp, own_site.coap + "/est/sen", make_csr(new_key(), serial, code)
        )
    assert response.code == Code.CHANGED, response.payload
    assert own_site.device(device_id).state == d.PROVISIONED


@pytest.mark.server_env({"CITYTWIN_ENROLL_MAX_FAILURES": "3"})
async def test_failed_attempts_are_throttled_with_max_age(own_site: Site) -> None:
    serial = unique("SN")
    device_id, code = own_site.enroll_code(serial)
    async with coap_client(own_site.trust) as tls:
        uri = own_site.coaps + "/est/sen"
        for _ in range(3):
            response = await post_csr(tls, uri, make_csr(new_key(), serial, "0000-0000-0000-0000"))
            assert response.code == Code.FORBIDDEN
        throttled = await post_csr(tls, uri, make_csr(new_key(), serial, code))
        assert throttled.code == Code.TOO_MANY_REQUESTS
        assert 200 < throttled.opt.max_age <= 300
        assert b"retry in" in throttled.payload
    assert own_site.device(device_id).state == d.REGISTERED


@pytest.mark.server_env({"CITYTWIN_COAPS_MAX_CONNECTIONS": "1", "CITYTWIN_COAPS_IDLE_TIMEOUT": "1"})
async def test_tls_connections_are_capped_and_closed_when_idle(own_site: Site) -> None:
    tls = ssl.create_default_context(cadata=own_site.trust.decode())
    tls.set_alpn_protocols(["coap"])
    port = own_site.server.coaps_port
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=tls)
    with pytest.raises((OSError, asyncio.IncompleteReadError)):
        second, _ = await asyncio.open_connection("127.0.0.1", port, ssl=tls)
        await second.readexactly(1)
    # Silent for longer than the idle timeout: the server closes the first connection...
    while await asyncio.wait_for(reader.read(1024), 10):
        pass
    writer.close()
    # ...which frees its slot (once the server has finished closing it).
    for _ in range(50):
        try:
            async with coap_client(own_site.trust) as client:
                response = await request(client, own_site.coaps + "/est/crts")
            break
        except aiocoap.error.NetworkError:
            await asyncio.sleep(0.1)
    assert response.code == Code.CONTENT


# --- zero-touch enrollment with a factory certificate -----------------------------------


async def test_zero_touch_enrollment_with_a_factory_certificate(site: Site) -> None:
    maker = Manufacturer.create(unique("ACME CA"))
    group_id = unique("acme")
    site.api.call(
        site.api.provisioning.CreateEnrollmentGroup,
        p.CreateEnrollmentGroupRequest(
            group_id=group_id,
            enrollment_group=p.EnrollmentGroup(ca_certificate_pem=pem(maker.cert).decode()),
        ),
    )
    serial = unique("SN")
    factory_cert, factory_key = maker.factory_certificate(serial)
    key = new_key()
    async with coap_client(site.trust, factory_cert, factory_key) as tls:
        uri = site.coaps + "/est/sen"
        # Not registered yet: come back later.
        waiting = await post_csr(tls, uri, make_csr(key, serial))
        assert waiting.code == Code.SERVICE_UNAVAILABLE, waiting.payload
        assert waiting.opt.max_age == 60
        site.api.call(
            site.api.devices.CreateDevice,
            d.CreateDeviceRequest(
                device=d.Device(kind=d.LAMP, model="lamp-led-dimmable", serial_number=serial)
            ),
        )
        mismatch = await post_csr(tls, uri, make_csr(new_key(), unique("SN")))
        assert mismatch.code == Code.FORBIDDEN
        assert b"factory certificate" in mismatch.payload
        response = await post_csr(tls, uri, make_csr(key, serial))
        assert response.code == Code.CHANGED, response.payload
    cert = certificate(response)
    device_id = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    (issued,) = site.certificates(str(device_id))
    assert issued.authorization == f"enrollment-group:{group_id}"
    assert site.device(str(device_id)).state == d.PROVISIONED


async def test_a_factory_certificate_of_an_unknown_maker_is_refused(site: Site) -> None:
    stranger = Manufacturer.create("not trusted")
    serial = unique("SN")
    factory_cert, factory_key = stranger.factory_certificate(serial)
    with pytest.raises(aiocoap.error.NetworkError):
        async with coap_client(site.trust, factory_cert, factory_key) as tls:
            await post_csr(tls, site.coaps + "/est/sen", make_csr(new_key(), serial))


# --- re-enrollment and revocation ------------------------------------------------------


@pytest.mark.server_env({})
async def test_renewal_supersedes_the_old_certificate(own_site: Site) -> None:
    site = own_site
    device_id, cert, key = await enrolled_device(site)
    serial = str(cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)[0].value)
    async with coap_client(site.trust, cert, key) as tls:  # type: ignore[arg-type]
        early = await post_csr(tls, site.coaps + "/est/sren", make_csr(new_key(), serial))
        assert early.code == Code.FORBIDDEN
        assert b"renewal opens" in early.payload
    site.api.call(
        site.api.provisioning.UpdateProvisioningPolicy,
        p.UpdateProvisioningPolicyRequest(
            policy=p.ProvisioningPolicy(renewal_window_days=0),
            update_mask=FieldMask(paths=["renewal_window_days"]),
        ),
    )
    new = new_key()
    async with coap_client(site.trust, cert, key) as tls:  # type: ignore[arg-type]
        wrong_serial = await post_csr(tls, site.coaps + "/est/sren", make_csr(new, unique("SN")))
        assert wrong_serial.code == Code.FORBIDDEN
        renewed = await post_csr(tls, site.coaps + "/.well-known/est/sren", make_csr(new, serial))
        assert renewed.code == Code.CHANGED, renewed.payload
        # The old certificate is superseded at once.
        again = await post_csr(tls, site.coaps + "/est/sren", make_csr(new_key(), serial))
        assert again.code == Code.FORBIDDEN
        assert b"superseded" in again.payload
    states = {c.name: (c.state, c.authorization) for c in site.certificates(device_id)}
    assert states == {
        f"certificates/{certificate(renewed).serial_number:x}": (p.VALID, "renewal"),
        f"certificates/{cert.serial_number:x}": (p.SUPERSEDED, "enrollment-code"),
    }
    assert [e.action for e in site.audit(device_id)][:2] == ["renew", "renew"]


async def test_renewal_needs_a_certificate_issued_here(site: Site) -> None:
    async with coap_client(site.trust) as tls:
        response = await post_csr(tls, site.coaps + "/est/sren", make_csr(new_key(), "SN-1"))
    assert response.code == Code.UNAUTHORIZED


async def test_a_revoked_certificate_is_refused(site: Site) -> None:
    device_id, cert, key = await enrolled_device(site)
    revoked = site.api.call(
        site.api.provisioning.RevokeCertificate,
        p.RevokeCertificateRequest(name=f"certificates/{cert.serial_number:x}", reason="stolen"),
    )
    assert revoked.state == p.REVOKED
    assert revoked.revocation_reason == "stolen"
    serial = str(cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)[0].value)
    async with coap_client(site.trust, cert, key) as tls:  # type: ignore[arg-type]
        response = await post_csr(tls, site.coaps + "/est/sren", make_csr(new_key(), serial))
    assert response.code == Code.FORBIDDEN
    assert b"revoked" in response.payload
    assert [e.action for e in site.audit(device_id)][:2] == ["renew", "revoke"]
