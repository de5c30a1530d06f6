"""The service's SUIT manifest key and the manifests it signs for firmware jobs.

One ECDSA P-256 key (ES256) per deployment, created by the first replica that needs it and
kept in the database encrypted with the CA passphrase, so every replica signs with it.
Devices fetch its public half from `/fw/manifest-key` over their authenticated connection.

A manifest's sequence number is the campaign's start time in milliseconds: it grows with every
campaign a device is sent, as the draft asks (a device refuses a manifest whose number is not
above the last it accepted), without a counter to coordinate between replicas; a rollback
campaign, started later, gets a higher number although its image is older.
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from typing import Final

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from tortoise.exceptions import IntegrityError

from firmware_ota.models import ManifestSigningKey
from firmware_ota.suit_manifests import (
    CITYTWIN_VENDOR_DOMAIN,
    ManifestContent,
    build_envelope,
    class_id,
    vendor_id,
)
from provisioning.certificate_authority import decrypt_private_key, encrypt_private_key

_ROW: Final = 1


async def ensure_manifest_key(passphrase: bytes) -> ec.EllipticCurvePrivateKey:
    """The deployment's manifest key, created on first use."""
    row = await ManifestSigningKey.get_or_none(id=_ROW)
    if row is None:
        key = ec.generate_private_key(ec.SECP256R1())
        try:
            await ManifestSigningKey.create(
                id=_ROW,
                private_key_pem=encrypt_private_key(key, passphrase).decode(),
                created_at=datetime.now(UTC),
            )
            return key
        except IntegrityError:
            # Another replica created it at the same moment; use theirs.
            row = await ManifestSigningKey.get(id=_ROW)
    return decrypt_private_key(row.private_key_pem.encode(), passphrase)


def public_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """The public half devices verify manifests with."""
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


class ManifestSigner:
    """Signs manifests, each (campaign, model, artifact) once per process."""

    def __init__(self, key: ec.EllipticCurvePrivateKey) -> None:
        self._key = key
        self._issued: dict[tuple[int, str, str], str] = {}

    def manifest_for(
        self,
        *,
        campaign_id: int,
        started_at: datetime,
        model: str,
        sha256: str,
        size: int,
        uri: str,
    ) -> str:
        """The base64 SUIT envelope for one campaign's image on one device model."""
        cache_key = (campaign_id, model, sha256)
        if cache_key not in self._issued:
            vendor = vendor_id(CITYTWIN_VENDOR_DOMAIN)
            content = ManifestContent(
                vendor_id=vendor,
                class_id=class_id(vendor, model),
                sequence_number=int(started_at.timestamp() * 1000),
                image_sha256=bytes.fromhex(sha256),
                image_size=size,
                uri=uri,
            )
            envelope = build_envelope(content, self._key)
            self._issued[cache_key] = base64.b64encode(envelope).decode()
        return self._issued[cache_key]
