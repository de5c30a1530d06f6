"""MCUboot images: parse the format imgtool writes and verify it as MCUboot would.

Layout (all little-endian), see MCUboot's design docs ("Image format") and imgtool's image.py:

    header     32 bytes (magic, load address, header size, protected TLV size, body size,
               flags, version), padded to `header size`
    body       `image size` bytes
    protected  optional TLV area (info magic 0x6908) whose size the header gives; it holds
               e.g. the security counter and is covered by the hash and the signature
    TLV area   info magic 0x6907: the SHA-256 TLV, the key's hash (KEYHASH) or the key itself
               (PUBKEY), and the signature TLV

The SHA-256 TLV is the hash of header + body + protected TLVs. With imgtool's default (not
`--pure`) signing, both key types sign that 32-byte digest: Ed25519 signs the digest as its
message, ECDSA P-256 signs the hashed region with SHA-256 (i.e. the same digest, prehashed),
DER-encoded. The input is untrusted: every size is checked against the data before use.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from firmware_ota.release_keys import KeyAlgorithm, ReleaseKey, mcuboot_key_hash
from twin.errors import ArtifactRejected

IMAGE_MAGIC = 0x96F3B83D
IMAGE_HEADER_SIZE = 32
TLV_INFO_MAGIC = 0x6907
TLV_PROT_INFO_MAGIC = 0x6908

IMAGE_F_ENCRYPTED_AES128 = 0x04
IMAGE_F_ENCRYPTED_AES256 = 0x08

TLV_KEYHASH = 0x01
TLV_PUBKEY = 0x02
TLV_SHA256 = 0x10
TLV_SHA384 = 0x11
TLV_SHA512 = 0x12
TLV_RSA2048_PSS = 0x20
TLV_ECDSA_SIG = 0x22
TLV_RSA3072_PSS = 0x23
TLV_ED25519 = 0x24
TLV_SIG_PURE = 0x25
TLV_SEC_CNT = 0x50

SHA256_SIZE = 32
SECURITY_COUNTER_SIZE = 4

# magic, load address, header size, protected TLV size, image size, flags,
# version major, minor, revision, build number, padding
_HEADER = struct.Struct("<IIHHIIBBHII")
_MAGIC_SIZE = 4
# magic and total size of a TLV area (the info itself included)
_TLV_INFO = struct.Struct("<HH")
# type and value length of one TLV
_TLV = struct.Struct("<HH")

_SIGNATURE_ALGORITHMS = {TLV_ED25519: KeyAlgorithm.ED25519, TLV_ECDSA_SIG: KeyAlgorithm.ECDSA_P256}
# The unprotected area is not covered by the signature, so it may hold only what verification
# needs (as MCUboot's TLV allow list requires); these known types get a precise refusal.
_UNPROTECTED_ALLOWED = {TLV_SHA256, TLV_KEYHASH, TLV_PUBKEY, *_SIGNATURE_ALGORITHMS}
# Checked in this order: a pure signature comes with a SHA-512 TLV, and naming the signature
# says more than naming its hash.
_UNSUPPORTED = {
    TLV_SIG_PURE: "pure signatures (imgtool --pure) are not supported",
    TLV_RSA2048_PSS: "RSA signatures are not supported (use Ed25519 or ECDSA P-256)",
    TLV_RSA3072_PSS: "RSA signatures are not supported (use Ed25519 or ECDSA P-256)",
    TLV_SHA384: "image hash is SHA-384; only SHA-256 images are supported",
    TLV_SHA512: "image hash is SHA-512; only SHA-256 images are supported",
}
_ENCRYPTED = IMAGE_F_ENCRYPTED_AES128 | IMAGE_F_ENCRYPTED_AES256
# imgtool --pad-sig pads ECDSA signatures with zeros after their DER SEQUENCE (for MCUboot
# < 1.5); a P-256 signature's length always fits the one-byte short form.
_DER_SEQUENCE = 0x30
_DER_SEQUENCE_HEADER_SIZE = 2


@dataclass(frozen=True)
class McubootImage:
    """What a verified MCUboot image says about itself."""

    version: str
    security_counter: int | None
    header_size: int
    image_size: int
    load_address: int
    image_sha256: bytes
    key_id: str


def looks_like_mcuboot(data: bytes) -> bool:
    """Whether `data` starts with the MCUboot image magic (nothing else is checked)."""
    return data[:_MAGIC_SIZE] == IMAGE_MAGIC.to_bytes(_MAGIC_SIZE, "little")


def verify_mcuboot_image(data: bytes, keys: Sequence[ReleaseKey]) -> McubootImage:
    """Parse `data` as an MCUboot image and verify its hash and its signature against `keys`.

    Raises `ArtifactRejected` saying what is wrong: a malformed or inconsistent layout, a
    hash that does not match (tampering), a missing or unsupported signature, a signature by
    a key not in `keys`, or one that does not verify.
    """
    if len(data) < IMAGE_HEADER_SIZE:
        raise ArtifactRejected(
            f"image is truncated: {len(data)} bytes, shorter than the "
            f"{IMAGE_HEADER_SIZE}-byte MCUboot header"
        )
    (magic, load_address, header_size, protected_size, image_size, flags, *version, _) = (
        _HEADER.unpack_from(data)
    )
    if magic != IMAGE_MAGIC:
        raise ArtifactRejected(f"bad image magic 0x{magic:08x}: not an MCUboot image")
    if header_size < IMAGE_HEADER_SIZE:
        raise ArtifactRejected(
            f"header size {header_size} is smaller than the {IMAGE_HEADER_SIZE}-byte header"
        )
    if flags & _ENCRYPTED:
        raise ArtifactRejected("encrypted images are not supported: their hash cannot be checked")
    body_end = header_size + image_size
    hashed_end = body_end + protected_size
    if hashed_end + _TLV_INFO.size > len(data):
        raise ArtifactRejected(
            f"image is truncated or its sizes are wrong: header ({header_size}) + body "
            f"({image_size}) + protected TLVs ({protected_size}) + TLV info exceed the "
            f"{len(data)} bytes of the file"
        )
    security_counter = _security_counter(data, body_end, protected_size)
    tlvs = _unprotected_tlvs(data, hashed_end)

    digest = hashlib.sha256(memoryview(data)[:hashed_end]).digest()
    expected = tlvs.get(TLV_SHA256)
    if expected is None:
        raise ArtifactRejected("image has no SHA-256 TLV")
    if len(expected) != SHA256_SIZE:
        raise ArtifactRejected(f"SHA-256 TLV has {len(expected)} bytes, not {SHA256_SIZE}")
    if expected != digest:
        raise ArtifactRejected("image hash does not match its SHA-256 TLV: image tampered")

    key = _signing_key(tlvs, digest, keys)
    major, minor, revision, build = version
    return McubootImage(
        version=f"{major}.{minor}.{revision}" + (f"+{build}" if build else ""),
        security_counter=security_counter,
        header_size=header_size,
        image_size=image_size,
        load_address=load_address,
        image_sha256=digest,
        key_id=key.key_id,
    )


def _security_counter(data: bytes, offset: int, size: int) -> int | None:
    """The security counter in the protected TLV area at `offset` (None without one)."""
    if size == 0:
        return None
    if size < _TLV_INFO.size:
        raise ArtifactRejected(
            f"protected TLV size {size} is smaller than its {_TLV_INFO.size}-byte info"
        )
    magic, total = _TLV_INFO.unpack_from(data, offset)
    if magic != TLV_PROT_INFO_MAGIC:
        raise ArtifactRejected(
            f"bad protected TLV area magic 0x{magic:04x} (expected 0x{TLV_PROT_INFO_MAGIC:04x})"
        )
    if total != size:
        raise ArtifactRejected(
            f"protected TLV area says it has {total} bytes but the header says {size}"
        )
    tlvs = _tlvs(data, offset + _TLV_INFO.size, offset + size, "protected")
    counter = tlvs.get(TLV_SEC_CNT)
    if counter is None:
        return None
    if len(counter) != SECURITY_COUNTER_SIZE:
        raise ArtifactRejected(
            f"security counter TLV has {len(counter)} bytes, not {SECURITY_COUNTER_SIZE}"
        )
    return int.from_bytes(counter, "little")


def _unprotected_tlvs(data: bytes, offset: int) -> dict[int, bytes]:
    """The TLVs of the unprotected area at `offset`, which must end exactly at the file's end."""
    magic, total = _TLV_INFO.unpack_from(data, offset)
    if magic != TLV_INFO_MAGIC:
        raise ArtifactRejected(
            f"bad TLV area magic 0x{magic:04x} (expected 0x{TLV_INFO_MAGIC:04x})"
        )
    if total < _TLV_INFO.size:
        raise ArtifactRejected(
            f"TLV area size {total} is smaller than its {_TLV_INFO.size}-byte info"
        )
    end = offset + total
    if end > len(data):
        raise ArtifactRejected(
            f"TLV area overruns the data: it ends at byte {end} of a {len(data)}-byte file"
        )
    # Bytes after the TLV area (imgtool --pad, --confirm) are signed by nobody, yet a device
    # would write them into its slot, where a trailer can preset the bootloader's swap state.
    if end < len(data):
        raise ArtifactRejected(
            f"{len(data) - end} unsigned bytes follow the TLV area "
            "(sign the image without --pad/--confirm)"
        )
    tlvs = _tlvs(data, offset + _TLV_INFO.size, end, "unprotected")
    for kind, refusal in _UNSUPPORTED.items():
        if kind in tlvs:
            raise ArtifactRejected(refusal)
    for kind in tlvs:
        if kind not in _UNPROTECTED_ALLOWED:
            raise ArtifactRejected(
                f"TLV 0x{kind:02x} is not allowed in the unprotected TLV area "
                "(it is not covered by the signature)"
            )
    return tlvs


def _tlvs(data: bytes, start: int, end: int, area: str) -> dict[int, bytes]:
    """The TLVs between `start` and `end` (within `data`) by type; they must fill the range."""
    tlvs: dict[int, bytes] = {}
    offset = start
    while offset < end:
        if offset + _TLV.size > end:
            raise ArtifactRejected(f"the {area} TLV area ends inside a TLV header")
        kind, length = _TLV.unpack_from(data, offset)
        offset += _TLV.size
        if offset + length > end:
            raise ArtifactRejected(f"TLV 0x{kind:02x} overruns the {area} TLV area")
        # imgtool writes each TLV once; a second copy could make a reader other than this
        # one (the device's bootloader) look at a different value.
        if kind in tlvs:
            raise ArtifactRejected(f"duplicate TLV 0x{kind:02x} in the {area} TLV area")
        tlvs[kind] = data[offset : offset + length]
        offset += length
    return tlvs


def _signing_key(tlvs: dict[int, bytes], digest: bytes, keys: Sequence[ReleaseKey]) -> ReleaseKey:
    """The registered key whose signature TLV over `digest` verifies."""
    signatures = [kind for kind in _SIGNATURE_ALGORITHMS if kind in tlvs]
    if not signatures:
        raise ArtifactRejected("image is not signed: it has no signature TLV")
    if len(signatures) > 1:
        raise ArtifactRejected("image has more than one signature TLV")
    if not keys:
        raise ArtifactRejected("no release keys are registered")
    kind = signatures[0]
    algorithm = _SIGNATURE_ALGORITHMS[kind]
    key_hash = tlvs.get(TLV_KEYHASH)
    embedded_key = tlvs.get(TLV_PUBKEY)
    candidates = [
        key
        for key in keys
        if key.algorithm == algorithm
        and key_hash in (None, mcuboot_key_hash(key))
        and embedded_key in (None, key.public_key_der)
    ]
    if not candidates:
        named = f" (key hash {key_hash.hex()})" if key_hash is not None else ""
        raise ArtifactRejected(f"image is signed by an unregistered {algorithm} key{named}")
    for key in candidates:
        if _verifies(key, tlvs[kind], digest):
            return key
    if key_hash is None and embedded_key is None:
        raise ArtifactRejected("image signature does not verify with any registered release key")
    raise ArtifactRejected("image signature is invalid")


def _verifies(key: ReleaseKey, signature: bytes, digest: bytes) -> bool:
    public_key = key.public_key()
    try:
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(
                _without_der_padding(signature), digest, ec.ECDSA(Prehashed(hashes.SHA256()))
            )
        else:
            public_key.verify(signature, digest)
    except InvalidSignature:
        return False
    return True


def _without_der_padding(signature: bytes) -> bytes:
    """An ECDSA signature without the zeros imgtool --pad-sig appends after its DER encoding."""
    if len(signature) < _DER_SEQUENCE_HEADER_SIZE or signature[0] != _DER_SEQUENCE:
        return signature
    der_size = _DER_SEQUENCE_HEADER_SIZE + signature[1]
    if any(signature[der_size:]):
        return signature
    return signature[:der_size]
