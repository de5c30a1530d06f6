"""MCUboot images signed by the real imgtool: accepted when intact and signed by a registered
key, refused with a reason otherwise, and never anything but ArtifactRejected on hostile input."""

from __future__ import annotations

import hashlib
import os
import random
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from firmware_ota.mcuboot_images import (
    IMAGE_F_ENCRYPTED_AES128,
    IMAGE_MAGIC,
    TLV_ECDSA_SIG,
    TLV_ED25519,
    TLV_INFO_MAGIC,
    TLV_KEYHASH,
    TLV_PROT_INFO_MAGIC,
    TLV_SEC_CNT,
    TLV_SHA256,
    looks_like_mcuboot,
    verify_mcuboot_image,
)
from firmware_ota.release_keys import ReleaseKey
from tests.firmware_ota.signing_fixtures import SigningKey, imgtool, imgtool_key, imgtool_sign
from twin.errors import ArtifactRejected

KEY_TYPES = ("ed25519", "ecdsa-p256")
BODY = os.urandom(700)
HEADER_SIZE = 0x200
MAGIC = IMAGE_MAGIC.to_bytes(4, "little")
SIZES_OFFSET = 8  # header size, protected TLV size, image size
FLAGS_OFFSET = 16
# (offset in the header, struct format) of its size fields
HEADER_SIZE_FIELDS = ((8, "<H"), (10, "<H"), (12, "<I"))
TLV_INFO_SIZE = 4
TLV_HEADER_SIZE = 4

Tlvs = list[tuple[int, bytes]]


@pytest.fixture(scope="module")
def directory(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mcuboot")


@pytest.fixture(scope="module")
def keys(directory: Path) -> dict[str, SigningKey]:
    return {key_type: imgtool_key(directory, key_type) for key_type in KEY_TYPES}


@pytest.fixture(scope="module")
def others(directory: Path) -> dict[str, SigningKey]:
    """Keys of the same types that are never registered."""
    return {key_type: imgtool_key(directory, key_type) for key_type in KEY_TYPES}


@pytest.fixture(scope="module")
def images(directory: Path, keys: dict[str, SigningKey]) -> dict[str, bytes]:
    """BODY signed as version 2.1.0+7 with security counter 5, by each key type."""
    return {
        key_type: imgtool_sign(directory, BODY, "--security-counter", "5", key=key.pem_path)
        for key_type, key in keys.items()
    }


def registered(keys: dict[str, SigningKey]) -> list[ReleaseKey]:
    return [key.release_key for key in keys.values()]


def hashed_end(image: bytes) -> int:
    """Where the unprotected TLV area starts (the end of what the SHA-256 TLV covers)."""
    header_size, protected_size, image_size = struct.unpack_from("<HHI", image, SIZES_OFFSET)
    return int(header_size + image_size + protected_size)


def unprotected_tlvs(image: bytes) -> Tlvs:
    start = hashed_end(image)
    offset, tlvs = start + TLV_INFO_SIZE, []
    while offset < len(image):
        kind, length = struct.unpack_from("<HH", image, offset)
        offset += TLV_HEADER_SIZE
        tlvs.append((kind, image[offset : offset + length]))
        offset += length
    return tlvs


def with_unprotected_tlvs(image: bytes, tlvs: Tlvs) -> bytes:
    """`image` with its unprotected TLV area (which no hash covers) replaced by `tlvs`."""
    area = b"".join(struct.pack("<HH", kind, len(value)) + value for kind, value in tlvs)
    info = struct.pack("<HH", TLV_INFO_MAGIC, TLV_INFO_SIZE + len(area))
    return image[: hashed_end(image)] + info + area


def changed(image: bytes, offset: int, value: bytes) -> bytes:
    return image[:offset] + value + image[offset + len(value) :]


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_imgtool_image_is_accepted_with_what_it_says(
    images: dict[str, bytes], keys: dict[str, SigningKey], key_type: str
) -> None:
    image = images[key_type]

    verified = verify_mcuboot_image(image, registered(keys))

    assert verified.version == "2.1.0+7"
    assert verified.security_counter == 5
    assert verified.key_id == keys[key_type].release_key.key_id
    assert verified.header_size == HEADER_SIZE
    assert verified.image_size == len(BODY)
    assert verified.load_address == 0
    assert verified.image_sha256 == hashlib.sha256(image[: hashed_end(image)]).digest()
    assert dict(unprotected_tlvs(image))[TLV_SHA256] == verified.image_sha256
    assert looks_like_mcuboot(image)


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_image_without_security_counter_or_build_number(
    directory: Path, keys: dict[str, SigningKey], key_type: str
) -> None:
    image = imgtool_sign(directory, BODY, key=keys[key_type].pem_path, version="1.0.3")

    verified = verify_mcuboot_image(image, registered(keys))

    assert verified.security_counter is None
    assert verified.version == "1.0.3"


def test_load_address_of_a_ram_loaded_image(directory: Path, keys: dict[str, SigningKey]) -> None:
    image = imgtool_sign(directory, BODY, "--load-addr", "0x20000000", key=keys["ed25519"].pem_path)

    assert verify_mcuboot_image(image, registered(keys)).load_address == 0x20000000


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_image_carrying_the_full_public_key(
    directory: Path, keys: dict[str, SigningKey], others: dict[str, SigningKey], key_type: str
) -> None:
    image = imgtool_sign(
        directory, BODY, "--public-key-format", "full", key=keys[key_type].pem_path
    )

    assert verify_mcuboot_image(image, registered(keys)).key_id == keys[key_type].release_key.key_id
    with pytest.raises(ArtifactRejected, match=f"signed by an unregistered {key_type} key"):
        verify_mcuboot_image(image, registered(others))


def test_zero_padded_ecdsa_signature_for_old_mcuboot(
    directory: Path, keys: dict[str, SigningKey]
) -> None:
    image = imgtool_sign(directory, BODY, "--pad-sig", key=keys["ecdsa-p256"].pem_path)

    verified = verify_mcuboot_image(image, registered(keys))

    assert verified.key_id == keys["ecdsa-p256"].release_key.key_id


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_image_without_key_tlv_is_tried_with_every_key(
    images: dict[str, bytes],
    keys: dict[str, SigningKey],
    others: dict[str, SigningKey],
    key_type: str,
) -> None:
    tlvs = [
        (kind, value) for kind, value in unprotected_tlvs(images[key_type]) if kind != TLV_KEYHASH
    ]
    image = with_unprotected_tlvs(images[key_type], tlvs)

    assert verify_mcuboot_image(image, registered(keys)).key_id == keys[key_type].release_key.key_id
    with pytest.raises(ArtifactRejected, match="does not verify with any registered release key"):
        verify_mcuboot_image(image, registered(others))


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_tampered_body_is_an_integrity_failure(
    images: dict[str, bytes], keys: dict[str, SigningKey], key_type: str
) -> None:
    offset = HEADER_SIZE + len(BODY) // 2
    image = images[key_type]
    tampered = changed(image, offset, bytes([image[offset] ^ 0x80]))

    with pytest.raises(ArtifactRejected, match="image hash does not match its SHA-256 TLV"):
        verify_mcuboot_image(tampered, registered(keys))


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_tampered_signature_is_refused(
    images: dict[str, bytes], keys: dict[str, SigningKey], key_type: str
) -> None:
    image = images[key_type]
    # The signature TLV comes last; ten bytes from the end lies inside it for both key types.
    tampered = changed(image, len(image) - 10, bytes([image[-10] ^ 0x01]))

    with pytest.raises(ArtifactRejected, match="image signature is invalid"):
        verify_mcuboot_image(tampered, registered(keys))


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_image_signed_by_an_unregistered_key_is_refused(
    directory: Path, keys: dict[str, SigningKey], others: dict[str, SigningKey], key_type: str
) -> None:
    image = imgtool_sign(directory, BODY, key=others[key_type].pem_path)
    key_hash = others[key_type].release_key.key_id

    with pytest.raises(
        ArtifactRejected, match=f"unregistered {key_type} key \\(key hash {key_hash}"
    ):
        verify_mcuboot_image(image, registered(keys))


def test_image_needs_a_key_of_its_signature_algorithm(
    images: dict[str, bytes], keys: dict[str, SigningKey]
) -> None:
    with pytest.raises(ArtifactRejected, match="signed by an unregistered ed25519 key"):
        verify_mcuboot_image(images["ed25519"], [keys["ecdsa-p256"].release_key])


def test_nothing_verifies_without_registered_keys(images: dict[str, bytes]) -> None:
    with pytest.raises(ArtifactRejected, match="no release keys are registered"):
        verify_mcuboot_image(images["ed25519"], [])


@pytest.mark.parametrize(
    ("options", "key_type", "message"),
    [
        ((), None, "image is not signed: it has no signature TLV"),
        (("--pad",), "ed25519", "unsigned bytes follow the TLV area"),
        (("--confirm",), "ecdsa-p256", "unsigned bytes follow the TLV area"),
        (("--pure",), "ed25519", r"pure signatures \(imgtool --pure\) are not supported"),
        (("--sha", "512"), "ed25519", "image hash is SHA-512"),
        ((), "rsa-2048", r"RSA signatures are not supported \(use Ed25519 or ECDSA P-256\)"),
        ((), "ecdsa-p384", "image hash is SHA-384; only SHA-256 images are supported"),
    ],
    ids=["unsigned", "padded", "confirmed", "pure", "sha512", "rsa", "p384"],
)
def test_images_imgtool_can_make_but_the_service_refuses(
    directory: Path,
    keys: dict[str, SigningKey],
    options: tuple[str, ...],
    key_type: str | None,
    message: str,
) -> None:
    key_path = None
    if key_type in keys:
        key_path = keys[key_type].pem_path
    elif key_type is not None:
        key_path = directory / f"{key_type}.pem"
        imgtool("keygen", "-k", str(key_path), "-t", key_type)
    image = imgtool_sign(directory, BODY, *options, key=key_path)

    with pytest.raises(ArtifactRejected, match=message):
        verify_mcuboot_image(image, registered(keys))


def test_encrypted_image_is_refused(images: dict[str, bytes], keys: dict[str, SigningKey]) -> None:
    image = changed(images["ed25519"], FLAGS_OFFSET, struct.pack("<I", IMAGE_F_ENCRYPTED_AES128))

    with pytest.raises(ArtifactRejected, match="encrypted images are not supported"):
        verify_mcuboot_image(image, registered(keys))


def without(kind: int) -> Callable[[Tlvs], Tlvs]:
    return lambda tlvs: [(k, value) for k, value in tlvs if k != kind]


def shortened(kind: int) -> Callable[[Tlvs], Tlvs]:
    return lambda tlvs: [(k, value[:-1] if k == kind else value) for k, value in tlvs]


def plus(kind: int, value: bytes) -> Callable[[Tlvs], Tlvs]:
    return lambda tlvs: [*tlvs, (kind, value)]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (without(TLV_SHA256), "image has no SHA-256 TLV"),
        (shortened(TLV_SHA256), "SHA-256 TLV has 31 bytes, not 32"),
        (without(TLV_ED25519), "image is not signed: it has no signature TLV"),
        (plus(TLV_ECDSA_SIG, bytes(70)), "image has more than one signature TLV"),
        (plus(TLV_SHA256, bytes(32)), "duplicate TLV 0x10 in the unprotected TLV area"),
        # A security counter outside the protected area would be nobody's word.
        (plus(TLV_SEC_CNT, struct.pack("<I", 99)), "TLV 0x50 is not allowed in the unprotected"),
    ],
    ids=["no-hash", "short-hash", "no-signature", "two-signatures", "duplicate", "counter"],
)
def test_edited_unprotected_tlv_area_is_refused(
    images: dict[str, bytes],
    keys: dict[str, SigningKey],
    edit: Callable[[Tlvs], Tlvs],
    message: str,
) -> None:
    image = images["ed25519"]
    edited = with_unprotected_tlvs(image, edit(unprotected_tlvs(image)))

    with pytest.raises(ArtifactRejected, match=message):
        verify_mcuboot_image(edited, registered(keys))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "image is truncated: 0 bytes"),
        (MAGIC + bytes(20), "shorter than the 32-byte MCUboot header"),
        (bytes(64), "bad image magic 0x00000000: not an MCUboot image"),
        (MAGIC + bytes(60), "header size 0 is smaller than the 32-byte header"),
    ],
    ids=["empty", "short-header", "bad-magic", "zero-header-size"],
)
def test_not_an_image(data: bytes, message: str) -> None:
    with pytest.raises(ArtifactRejected, match=message):
        verify_mcuboot_image(data, [])


def test_looks_like_mcuboot_checks_the_magic_only() -> None:
    assert looks_like_mcuboot(MAGIC)
    assert not looks_like_mcuboot(MAGIC[::-1] + bytes(60))
    assert not looks_like_mcuboot(b"\x3d\xb8")
    assert not looks_like_mcuboot(b"")


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_every_truncation_is_refused(
    images: dict[str, bytes], keys: dict[str, SigningKey], key_type: str
) -> None:
    image = images[key_type]
    for size in range(len(image)):
        with pytest.raises(ArtifactRejected):
            verify_mcuboot_image(image[:size], registered(keys))


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_every_single_byte_change_is_refused(
    images: dict[str, bytes], keys: dict[str, SigningKey], key_type: str
) -> None:
    image = images[key_type]
    rng = random.Random(key_type)
    for offset in range(len(image)):
        tampered = changed(image, offset, bytes([image[offset] ^ rng.randrange(1, 256)]))
        with pytest.raises(ArtifactRejected):
            verify_mcuboot_image(tampered, registered(keys))


def size_fields(image: bytes) -> list[tuple[int, str]]:
    """(offset, struct format) of every size field of `image`: header, TLV infos, TLVs."""
    header_size, protected_size, image_size = struct.unpack_from("<HHI", image, SIZES_OFFSET)
    body_end = header_size + image_size
    fields = [*HEADER_SIZE_FIELDS, (body_end + 2, "<H"), (hashed_end(image) + 2, "<H")]
    for start, end in ((body_end, body_end + protected_size), (hashed_end(image), len(image))):
        offset = start + TLV_INFO_SIZE
        while offset < end:
            fields.append((offset + 2, "<H"))
            offset += TLV_HEADER_SIZE + struct.unpack_from("<H", image, offset + 2)[0]
    return fields


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_lying_size_fields_are_refused(
    images: dict[str, bytes], keys: dict[str, SigningKey], key_type: str
) -> None:
    image = images[key_type]
    fields = size_fields(image)
    assert len(fields) == 9  # 3 in the header, 2 TLV infos, counter, hash, key hash, signature
    for offset, fmt in fields:
        true_size = struct.unpack_from(fmt, image, offset)[0]
        largest = 2 ** (8 * struct.calcsize(fmt)) - 1
        for lie in {0, 1, 3, 4, true_size - 4, true_size - 1, true_size + 1, largest} - {true_size}:
            with pytest.raises(ArtifactRejected):
                verify_mcuboot_image(
                    changed(image, offset, struct.pack(fmt, lie)), registered(keys)
                )


def test_random_layouts_are_refused(keys: dict[str, SigningKey]) -> None:
    """Plausible layouts (the TLV info magics where the header's sizes put them) filled with
    random sizes and random TLVs."""
    rng = random.Random(7)
    for _ in range(3000):
        header_size = rng.choice([0, 31, 32, 33, 64, rng.randrange(1 << 16)])
        image_size = rng.choice([0, 1, 64, rng.randrange(1 << 32)])
        protected_size = rng.choice([0, 3, 4, 8, 12, rng.randrange(1 << 16)])
        header = struct.pack(
            "<IIHHIIBBHII",
            IMAGE_MAGIC,
            0,
            header_size,
            protected_size,
            image_size,
            0,
            1,
            0,
            0,
            0,
            0,
        )
        data = bytearray(header + rng.randbytes(rng.randrange(512)))
        body_end = header_size + image_size
        for offset, magic, total in (
            (body_end, TLV_PROT_INFO_MAGIC, protected_size),
            (body_end + protected_size, TLV_INFO_MAGIC, rng.randrange(1 << 16)),
        ):
            if offset + TLV_INFO_SIZE <= len(data) and rng.random() < 0.9:
                struct.pack_into("<HH", data, offset, magic, total)
        with pytest.raises(ArtifactRejected):
            verify_mcuboot_image(bytes(data), registered(keys))
