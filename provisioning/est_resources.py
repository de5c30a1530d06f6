"""EST-coaps (RFC 9148) resources: `crts` (the CA certificates), `sen` (simple enroll) and
`sren` (simple re-enroll), served at `/.well-known/est/...` and at the `/est/...` alias.

Answers are certs-only PKCS#7 (content-format 281) unless the Accept option asks for a single
DER certificate (287). CSRs must arrive as DER PKCS#10 (286), block-wise if they are large;
the reassembled CSR is bounded by the enroller's CSR limit.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import aiocoap
import aiocoap.resource
from aiocoap.numbers import ContentFormat
from aiocoap.numbers.codes import Code
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from provisioning.certificate_authority import certs_only_pkcs7
from provisioning.est_enrollment import Enroller
from twin.coap_resources import BoundedResource, negotiate_accept, require_content_format
from twin.coap_tls import peer_address, peer_certificate
from twin.errors import PermissionDenied

PKCS7_CERTS_ONLY = 281
PKCS10 = 286
PKIX_CERT = 287

WELL_KNOWN_PATH = (".well-known", "est")
ALIAS_PATH = ("est",)


def _certificates(certs: list[x509.Certificate], content_format: int) -> aiocoap.Message:
    if content_format == PKIX_CERT:
        payload = certs[0].public_bytes(serialization.Encoding.DER)
    else:
        payload = certs_only_pkcs7(certs)
    return aiocoap.Message(
        code=Code.CONTENT, payload=payload, content_format=ContentFormat(content_format)
    )


class CaCertificates(BoundedResource):
    """`crts`: GET the CA certificates (issuing CA first). Open to anyone, also over UDP."""

    rt = "ace.est.crts"
    ct = f"{PKCS7_CERTS_ONLY} {PKIX_CERT}"

    def __init__(self, enroller: Enroller) -> None:
        super().__init__(max_body_bytes=0)
        self.enroller = enroller

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        """The issuing and root CA certificates (287: the issuing CA's alone)."""
        content_format = negotiate_accept(request, PKCS7_CERTS_ONLY, PKIX_CERT)
        return _certificates(self.enroller.ca_certificates(), content_format)


class _Enrollment(BoundedResource):
    ct = f"{PKCS7_CERTS_ONLY} {PKIX_CERT}"

    def __init__(
        self,
        enroller: Enroller,
        issue: Callable[[bytes, bytes | None, str], Awaitable[x509.Certificate]],
        *,
        allow_insecure: bool,
    ) -> None:
        super().__init__(max_body_bytes=enroller.max_csr_bytes)
        self.issue = issue
        self.allow_insecure = allow_insecure

    async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
        """Check the request's form, then let the enroller decide and sign."""
        if not self.allow_insecure and request.remote.scheme != "coaps+tcp":
            raise PermissionDenied("enrollment is only served over coaps+tcp")
        require_content_format(request, PKCS10)
        content_format = negotiate_accept(request, PKCS7_CERTS_ONLY, PKIX_CERT)
        cert = await self.issue(request.payload, peer_certificate(request), peer_address(request))
        response = _certificates([cert], content_format)
        response.code = Code.CHANGED
        return response


class SimpleEnroll(_Enrollment):
    """`sen`: POST a CSR, authorised by an enrollment code or a factory certificate."""

    rt = "ace.est.sen"

    def __init__(self, enroller: Enroller, *, allow_insecure: bool) -> None:
        super().__init__(enroller, enroller.simple_enroll, allow_insecure=allow_insecure)


class SimpleReenroll(_Enrollment):
    """`sren`: POST a CSR over a connection authenticated by the current certificate."""

    rt = "ace.est.sren"

    def __init__(self, enroller: Enroller) -> None:
        super().__init__(enroller, enroller.simple_reenroll, allow_insecure=False)


def add_est_resources(
    site: aiocoap.resource.Site, enroller: Enroller, *, allow_insecure_enrollment: bool
) -> None:
    """Add `crts`, `sen` and `sren` under both EST paths. `allow_insecure_enrollment` lets
    `sen` run over plain CoAP (closed on-site networks only)."""
    for base in (WELL_KNOWN_PATH, ALIAS_PATH):
        site.add_resource([*base, "crts"], CaCertificates(enroller))
        site.add_resource(
            [*base, "sen"], SimpleEnroll(enroller, allow_insecure=allow_insecure_enrollment)
        )
        site.add_resource([*base, "sren"], SimpleReenroll(enroller))
