"""Release keys: the public keys whose signatures make a firmware artifact acceptable.

Only Ed25519 and ECDSA P-256 are supported: they are what MCUboot devices verify with small
code, and what both detached signatures and MCUboot images use here. A key is named by its
`key_id`, the SHA-256 of its DER SubjectPublicKeyInfo, which is stable however the key was
uploaded (PEM or DER, public or private file).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import StrEnum
from typing import TypeAlias

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, rsa, x448, x25519
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from twin.errors import InvalidArgument

# A key file is a few hundred bytes; the bound keeps hostile uploads (say a huge RSA key,
# whose parsing is slow) from costing more than a glance.
MAX_KEY_FILE_BYTES = 16 * 1024

_PEM_BEGIN = b"-----BEGIN "
# Matches "PRIVATE KEY", "EC PRIVATE KEY", "ENCRYPTED PRIVATE KEY", "RSA PRIVATE KEY", ...
_PEM_PRIVATE_LABEL = b"PRIVATE KEY-----"
_SUPPORTED = "use Ed25519 or ECDSA P-256"

# Names of key types that parse but are refused, for the refusal message.
_UNSUPPORTED_KINDS: tuple[tuple[type[object], str], ...] = (
    (rsa.RSAPublicKey, "RSA"),
    (dsa.DSAPublicKey, "DSA"),
    (ed448.Ed448PublicKey, "Ed448"),
    (x25519.X25519PublicKey, "X25519"),
    (x448.X448PublicKey, "X448"),
)

SupportedPublicKey: TypeAlias = Ed25519PublicKey | ec.EllipticCurvePublicKey


class KeyAlgorithm(StrEnum):
    """The signature algorithm a release key verifies."""

    ED25519 = "ed25519"
    ECDSA_P256 = "ecdsa-p256"


@dataclass(frozen=True)
class ReleaseKey:
    """A registered release key: its id, algorithm and DER SubjectPublicKeyInfo."""

    key_id: str
    algorithm: KeyAlgorithm
    public_key_der: bytes

    def public_key(self) -> SupportedPublicKey:
        """The key as a `cryptography` public key object, ready to verify with."""
        return _classify(serialization.load_der_public_key(self.public_key_der))[1]

    def public_key_pem(self) -> str:
        """The key as a PEM "PUBLIC KEY" block (SubjectPublicKeyInfo)."""
        return (
            self.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode("ascii")
        )


def parse_public_key(data: bytes) -> ReleaseKey:
    """The release key in `data`: a PEM or DER public key, or an unencrypted PEM private key.

    A private key file is accepted because `imgtool keygen` writes only that file and release
    engineers often have nothing else; only its public half is derived and kept, the private
    part is never stored. Unsupported or unreadable keys raise `InvalidArgument` saying why.
    """
    if len(data) > MAX_KEY_FILE_BYTES:
        raise InvalidArgument(f"key file is too large (more than {MAX_KEY_FILE_BYTES} bytes)")
    text = data.strip()
    first_line = text.split(b"\n", 1)[0]
    try:
        if first_line.startswith(_PEM_BEGIN) and first_line.rstrip().endswith(_PEM_PRIVATE_LABEL):
            loaded = serialization.load_pem_private_key(text, password=None).public_key()
        elif first_line.startswith(_PEM_BEGIN):
            loaded = serialization.load_pem_public_key(text)
        else:
            loaded = serialization.load_der_public_key(data)
    except TypeError:
        # cryptography's answer to a password-protected private key.
        raise InvalidArgument(
            "the private key is encrypted; upload its public key instead "
            "(imgtool getpub -k key.pem -e pem)"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise InvalidArgument(
            "not a readable public key (expected a PEM or DER public key, or a PEM private key)"
        ) from None
    algorithm, public_key = _classify(loaded)
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return ReleaseKey(
        key_id=hashlib.sha256(der).hexdigest(), algorithm=algorithm, public_key_der=der
    )


def mcuboot_key_hash(key: ReleaseKey) -> bytes:
    """The KEYHASH TLV value MCUboot images carry for `key`.

    imgtool (2.5, default non-pure signing) embeds the DER SubjectPublicKeyInfo for both
    Ed25519 and ECDSA P-256 keys, and the TLV is the SHA-256 of those bytes, the same digest
    MCUboot computes over its built-in keys to pick the one that verifies.
    """
    return hashlib.sha256(key.public_key_der).digest()


def _classify(key: PublicKeyTypes) -> tuple[KeyAlgorithm, SupportedPublicKey]:
    if isinstance(key, Ed25519PublicKey):
        return KeyAlgorithm.ED25519, key
    if isinstance(key, ec.EllipticCurvePublicKey):
        if isinstance(key.curve, ec.SECP256R1):
            return KeyAlgorithm.ECDSA_P256, key
        raise InvalidArgument(
            f"ECDSA keys on curve {key.curve.name} are not supported ({_SUPPORTED})"
        )
    kind = next(
        (name for cls, name in _UNSUPPORTED_KINDS if isinstance(key, cls)), type(key).__name__
    )
    raise InvalidArgument(f"{kind} keys are not supported ({_SUPPORTED})")
