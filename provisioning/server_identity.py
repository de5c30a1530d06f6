"""The service's own TLS identity, issued by its fleet CA: a fresh key and certificate for
the names the service is reached by, so devices that trust the CA (from `crts`) trust the
service without any further set-up."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from provisioning.certificate_authority import CertificateAuthority, issue_server_certificate

# Short, since a new one is issued at every start anyway; renewed by restarting.
SERVER_CERT_VALIDITY_DAYS = 90


@dataclass(frozen=True)
class ServerIdentity:
    """A TLS server certificate chain (leaf, then issuing CA) and its unencrypted key, PEM."""

    chain_pem: bytes
    key_pem: bytes


def split_names(names: list[str] | tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(DNS names, IP addresses) of a list of host names and addresses."""
    dns: list[str] = []
    ips: list[str] = []
    for name in names:
        try:
            ips.append(str(ipaddress.ip_address(name)))
        except ValueError:
            dns.append(name)
    return dns, ips


def issue_server_identity(
    ca: CertificateAuthority,
    names: list[str] | tuple[str, ...],
    validity_days: int = SERVER_CERT_VALIDITY_DAYS,
) -> ServerIdentity:
    """A new P-256 key and a certificate for `names` (DNS names and IP addresses)."""
    key = ec.generate_private_key(ec.SECP256R1())
    dns, ips = split_names(names)
    cert = issue_server_certificate(
        ca, key.public_key(), dns_names=dns, ip_addresses=ips, validity_days=validity_days
    )
    chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (cert, ca.issuing_cert))
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return ServerIdentity(chain_pem=chain, key_pem=key_pem)
