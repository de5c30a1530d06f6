"""Detached signatures: a release key's signature over a firmware file's bytes.

The formats are those of the OpenSSL command line, so release engineers can sign with tools
they already have:

* Ed25519: pure Ed25519 over the file's bytes, 64 bytes
  (`openssl pkeyutl -sign -rawin -inkey key.pem -in firmware.bin`);
* ECDSA P-256: ECDSA with SHA-256 over the file's bytes, DER-encoded
  (`openssl dgst -sha256 -sign key.pem firmware.bin`).
"""

from __future__ import annotations

from collections.abc import Sequence

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from firmware_ota.release_keys import ReleaseKey
from twin.errors import ArtifactRejected


def verify_detached(data: bytes, signature: bytes, keys: Sequence[ReleaseKey]) -> ReleaseKey:
    """The release key in `keys` whose detached `signature` over `data` verifies.

    `signature` is the raw signature (already base64-decoded). Raises `ArtifactRejected` when
    it is empty, when no keys are registered, or when no key verifies it.
    """
    if not signature:
        raise ArtifactRejected("signature is empty")
    if not keys:
        raise ArtifactRejected("no release keys are registered")
    for key in keys:
        if _verifies(key, data, signature):
            return key
    raise ArtifactRejected("signature does not verify with any registered release key")


def _verifies(key: ReleaseKey, data: bytes, signature: bytes) -> bool:
    # A signature of the wrong shape for the key (an Ed25519 one tried with an ECDSA key, say)
    # is just another InvalidSignature, so every key can be tried in turn.
    public_key = key.public_key()
    try:
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        else:
            public_key.verify(signature, data)
    except InvalidSignature:
        return False
    return True
