"""SUIT manifests: round trips, tampering, hostile input, and taylor-suit as a second opinion.

taylor-suit (the `taylor` module and CLI) encodes and signs SUIT envelopes from a JSON
description but cannot decode or validate one. So the envelope's well-formedness is checked by
building the same manifest with taylor from an equivalent JSON description and comparing the
two, layer by layer, decoded (taylor orders map keys by its JSON names, so the bytes differ
while the structure is the same); and `read_envelope` must accept what taylor signs.
"""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeAlias

import cbor2
import pytest
import taylor
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from firmware_ota import suit_manifests as suit
from firmware_ota.suit_manifests import ManifestContent, build_envelope, read_envelope
from twin.errors import ArtifactRejected

SigningKey: TypeAlias = Ed25519PrivateKey | ec.EllipticCurvePrivateKey

IMAGE = bytes(range(256)) * 37
IMAGE_SHA256 = hashlib.sha256(IMAGE).digest()
VENDOR = suit.vendor_id("city.example")
CONTENT = ManifestContent(
    vendor_id=VENDOR,
    class_id=suit.class_id(VENDOR, "streetlamp-controller-v2"),
    sequence_number=42,
    image_sha256=IMAGE_SHA256,
    image_size=len(IMAGE),
    uri=f"coaps+tcp://city.example:5684/fw/{IMAGE_SHA256.hex()}",
)

# The reporting policies the draft's examples use: everything for conditions, failures for
# directives.
REPORT_ALL = (
    suit.REPORT_RECORD_ON_SUCCESS
    | suit.REPORT_RECORD_ON_FAILURE
    | suit.REPORT_SYSINFO_ON_SUCCESS
    | suit.REPORT_SYSINFO_ON_FAILURE
)
REPORT_FAILURE = suit.REPORT_RECORD_ON_FAILURE
P256_COORDINATE_BYTES = 32
COSE_ALG_ES384 = -35
COSE_ALG_SHA384 = -43
COSE_ALG_SHA512 = -44
CBOR_PEN_TAG = 112


@pytest.fixture(scope="module")
def ed25519_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def p256_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module", params=["ed25519", "p256"])
def key(
    request: pytest.FixtureRequest,
    ed25519_key: Ed25519PrivateKey,
    p256_key: ec.EllipticCurvePrivateKey,
) -> SigningKey:
    return ed25519_key if request.param == "ed25519" else p256_key


def pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def sign_manifest(manifest: bytes, key: SigningKey) -> bytes:
    """An envelope around `manifest`, assembled here from the draft and RFC 9052 alone.

    It lets tests sign manifests that `build_envelope` would never produce, and is a second
    implementation to compare `build_envelope` with.
    """
    manifest_digest = hashlib.sha256(cbor2.dumps(manifest)).digest()
    suit_digest = cbor2.dumps([suit.COSE_ALG_SHA256, manifest_digest])
    if isinstance(key, Ed25519PrivateKey):
        protected = cbor2.dumps({suit.COSE_HEADER_ALG: suit.COSE_ALG_EDDSA})
        signature = key.sign(cbor2.dumps(["Signature1", protected, b"", suit_digest]))
    else:
        protected = cbor2.dumps({suit.COSE_HEADER_ALG: suit.COSE_ALG_ES256})
        der = key.sign(
            cbor2.dumps(["Signature1", protected, b"", suit_digest]), ec.ECDSA(hashes.SHA256())
        )
        r, s = decode_dss_signature(der)
        signature = r.to_bytes(P256_COORDINATE_BYTES, "big") + s.to_bytes(
            P256_COORDINATE_BYTES, "big"
        )
    sign1 = cbor2.dumps(cbor2.CBORTag(suit.COSE_SIGN1_TAG, [protected, {}, None, signature]))
    return cbor2.dumps(
        cbor2.CBORTag(
            suit.SUIT_ENVELOPE_TAG,
            {
                suit.ENVELOPE_AUTHENTICATION_WRAPPER: cbor2.dumps([suit_digest, sign1]),
                suit.ENVELOPE_MANIFEST: manifest,
            },
        )
    )


def envelope_parts(envelope: bytes) -> tuple[list[Any], bytes]:
    """The decoded authentication wrapper (digest, then COSE_Sign1 blocks) and manifest bytes."""
    tagged = cbor2.loads(envelope)
    assert tagged.tag == suit.SUIT_ENVELOPE_TAG
    assert set(tagged.value) == {suit.ENVELOPE_AUTHENTICATION_WRAPPER, suit.ENVELOPE_MANIFEST}
    wrapper = cbor2.loads(tagged.value[suit.ENVELOPE_AUTHENTICATION_WRAPPER])
    return [cbor2.loads(item) for item in wrapper], tagged.value[suit.ENVELOPE_MANIFEST]


def manifest_tree(manifest: bytes) -> dict[int, Any]:
    """The manifest with every byte string that holds CBOR decoded in place."""
    tree: dict[int, Any] = cbor2.loads(manifest)
    common = cbor2.loads(tree[suit.MANIFEST_COMMON])
    shared = cbor2.loads(common[suit.COMMON_SHARED_SEQUENCE])
    parameters = shared[1]  # of the override-parameters that opens the shared sequence
    parameters[suit.PARAMETER_IMAGE_DIGEST] = cbor2.loads(parameters[suit.PARAMETER_IMAGE_DIGEST])
    common[suit.COMMON_SHARED_SEQUENCE] = shared
    tree[suit.MANIFEST_COMMON] = common
    for sequence in (suit.MANIFEST_INSTALL, suit.MANIFEST_VALIDATE, suit.MANIFEST_INVOKE):
        if sequence in tree:
            tree[sequence] = cbor2.loads(tree[sequence])
    return tree


@dataclass(frozen=True)
class Raw:
    """A manifest member that `encode_manifest` must leave as it is, not wrap in a bstr."""

    value: object


def encode_manifest(tree: Mapping[int, Any]) -> bytes:
    """The inverse of `manifest_tree`: the same manifest with its byte strings put back."""

    def wrap(value: object) -> object:
        return value.value if isinstance(value, Raw) else cbor2.dumps(value, canonical=True)

    common = dict(tree[suit.MANIFEST_COMMON])
    shared = list(common[suit.COMMON_SHARED_SEQUENCE])
    parameters = dict(shared[1])
    parameters[suit.PARAMETER_IMAGE_DIGEST] = wrap(parameters[suit.PARAMETER_IMAGE_DIGEST])
    shared[1] = parameters
    common[suit.COMMON_SHARED_SEQUENCE] = wrap(shared)
    encoded = dict(tree)
    encoded[suit.MANIFEST_COMMON] = wrap(common)
    for sequence in (suit.MANIFEST_INSTALL, suit.MANIFEST_VALIDATE, suit.MANIFEST_INVOKE):
        if sequence in encoded:
            encoded[sequence] = wrap(encoded[sequence])
    return cbor2.dumps(encoded, canonical=True)


def taylor_description(content: ManifestContent) -> dict[str, Any]:
    """`content` in taylor's JSON manifest description, with the same command sequences.

    taylor names the sequences after the workflow steps: payload-installation is suit-install,
    image-validation is suit-validate.
    """
    return {
        "version": 1,
        "sequence-number": content.sequence_number,
        "suit-common": {
            "suit-components": [[part.hex() for part in content.component]],
            "suit-shared-sequence": [
                {
                    "suit-directive-override-parameters": {
                        "vendor-id": str(content.vendor_id),
                        "class-id": str(content.class_id),
                        "image-digest": {
                            "algorithm": "sha256",
                            "digest": content.image_sha256.hex(),
                        },
                        "image-size": content.image_size,
                    }
                },
                {"suit-condition-vendor-identifier": REPORT_ALL},
                {"suit-condition-class-identifier": REPORT_ALL},
            ],
        },
        "sequence": {
            "payload-installation": [
                {"suit-directive-override-parameters": {"uri": content.uri}},
                {"suit-directive-fetch": REPORT_FAILURE},
                {"suit-condition-image-match": REPORT_ALL},
            ],
            "image-validation": [{"suit-condition-image-match": REPORT_ALL}],
            "suit-invoke": [{"suit-directive-invoke": REPORT_FAILURE}],
        },
    }


# Round trips and identifiers.


def test_round_trip(key: SigningKey) -> None:
    envelope = build_envelope(CONTENT, key)
    assert read_envelope(envelope, key.public_key()) == CONTENT


def test_round_trip_keeps_component_and_a_path_uri(ed25519_key: Ed25519PrivateKey) -> None:
    content = replace(CONTENT, uri=f"/fw/{IMAGE_SHA256.hex()}", component=(b"app", b"\x00"))
    envelope = build_envelope(content, ed25519_key)
    assert read_envelope(envelope, ed25519_key.public_key()) == content


def test_largest_content_fits_the_envelope_bound(p256_key: ec.EllipticCurvePrivateKey) -> None:
    content = replace(
        CONTENT,
        sequence_number=2**64 - 1,
        image_size=2**64 - 1,
        uri="/" + "u" * (suit.MAX_URI_LENGTH - 1),
        component=(b"c" * suit.MAX_COMPONENT_SEGMENT_BYTES,) * suit.MAX_COMPONENT_SEGMENTS,
    )
    envelope = build_envelope(content, p256_key)
    assert len(envelope) <= suit.MAX_ENVELOPE_BYTES
    assert read_envelope(envelope, p256_key.public_key()) == content


def test_vendor_and_class_ids_are_the_drafts_uuid5_values() -> None:
    # The vendor id of the draft's examples, and the pair in Nordic's nRF Connect SUIT docs.
    assert suit.vendor_id("arm.com") == uuid.UUID("fa6b4a53-d5ad-5fdf-be9d-e663e4d41ffe")
    nordic = suit.vendor_id("nordicsemi.com")
    assert nordic == uuid.UUID("7617daa5-71fd-5a85-8f94-e28d735ce9f4")
    assert suit.class_id(nordic, "nRF54H20_sample_app") == uuid.UUID(
        "08c1b599-55e8-5fbc-9e76-7bc29ce1b04d"
    )


def test_vendor_and_class_ids_are_stable_and_scoped_by_vendor() -> None:
    assert suit.vendor_id("city.example") == VENDOR
    assert VENDOR.version == 5
    assert suit.class_id(VENDOR, "streetlamp-controller-v2") == CONTENT.class_id
    other_vendor = suit.vendor_id("other.example")
    assert suit.class_id(other_vendor, "streetlamp-controller-v2") != CONTENT.class_id


def test_envelope_is_what_the_draft_and_rfc_9052_assemble(ed25519_key: Ed25519PrivateKey) -> None:
    # Ed25519 is deterministic, so an independent assembly must give the very same bytes.
    envelope = build_envelope(CONTENT, ed25519_key)
    _, manifest = envelope_parts(envelope)
    assert sign_manifest(manifest, ed25519_key) == envelope


def test_encode_manifest_inverts_manifest_tree(ed25519_key: Ed25519PrivateKey) -> None:
    _, manifest = envelope_parts(build_envelope(CONTENT, ed25519_key))
    assert encode_manifest(manifest_tree(manifest)) == manifest


# taylor-suit as an independent encoder.


def test_manifest_has_the_structure_taylor_builds(key: SigningKey) -> None:
    _, ours = envelope_parts(build_envelope(CONTENT, key))
    _, theirs = envelope_parts(taylor.build_envelope(taylor_description(CONTENT)))
    assert manifest_tree(ours) == manifest_tree(theirs)


def test_authentication_wrapper_has_the_structure_taylor_builds(
    p256_key: ec.EllipticCurvePrivateKey,
) -> None:
    ours, our_manifest = envelope_parts(build_envelope(CONTENT, p256_key))
    theirs, their_manifest = envelope_parts(
        taylor.build_envelope(taylor_description(CONTENT), key_pem=pem(p256_key))
    )
    for wrapper, manifest in ((ours, our_manifest), (theirs, their_manifest)):
        digest, sign1 = wrapper
        # Both digest the manifest byte string with its CBOR head.
        assert digest == [suit.COSE_ALG_SHA256, hashlib.sha256(cbor2.dumps(manifest)).digest()]
        assert sign1.tag == suit.COSE_SIGN1_TAG
        protected, unprotected, payload, signature = sign1.value
        assert cbor2.loads(protected) == {suit.COSE_HEADER_ALG: suit.COSE_ALG_ES256}
        assert (dict(unprotected), payload, len(signature)) == ({}, None, 2 * P256_COORDINATE_BYTES)


def test_reads_what_taylor_signs(p256_key: ec.EllipticCurvePrivateKey) -> None:
    envelope = taylor.build_envelope(taylor_description(CONTENT), key_pem=pem(p256_key))
    assert read_envelope(envelope, p256_key.public_key()) == CONTENT


def test_reads_what_the_taylor_cli_signs(
    p256_key: ec.EllipticCurvePrivateKey, tmp_path: Path
) -> None:
    (tmp_path / "key.pem").write_bytes(pem(p256_key))
    (tmp_path / "lamp.json").write_text(json.dumps(taylor_description(CONTENT)))
    subprocess.run(
        [sys.executable, "-m", "taylor", "lamp.json", "--key", "key.pem", "--output", "."],
        cwd=tmp_path,
        check=True,
        capture_output=True,
    )
    envelope = (tmp_path / "lamp.cbor").read_bytes()
    assert read_envelope(envelope, p256_key.public_key()) == CONTENT


def test_refuses_taylors_es384_signature() -> None:
    p384_key = ec.generate_private_key(ec.SECP384R1())
    envelope = taylor.build_envelope(taylor_description(CONTENT), key_pem=pem(p384_key))
    with pytest.raises(ArtifactRejected, match=f"signature algorithm {COSE_ALG_ES384} is not"):
        read_envelope(envelope, p384_key.public_key())


def test_refuses_taylors_sha384_manifest_digest(p256_key: ec.EllipticCurvePrivateKey) -> None:
    envelope = taylor.build_envelope(
        taylor_description(CONTENT), key_pem=pem(p256_key), manifest_digest="sha384"
    )
    with pytest.raises(ArtifactRejected, match=f"digest algorithm {COSE_ALG_SHA384} is not"):
        read_envelope(envelope, p256_key.public_key())


def test_refuses_taylors_unsigned_envelope(p256_key: ec.EllipticCurvePrivateKey) -> None:
    envelope = taylor.build_envelope(taylor_description(CONTENT))
    with pytest.raises(ArtifactRejected, match="not signed"):
        read_envelope(envelope, p256_key.public_key())


# Tampering and the wrong keys.


def test_changed_manifest_byte_fails_the_digest(key: SigningKey) -> None:
    envelope = build_envelope(CONTENT, key)
    uri = CONTENT.uri.encode()
    assert envelope.count(uri) == 1
    tampered = envelope.replace(uri, uri.replace(b"city.example", b"evil.example"))
    with pytest.raises(ArtifactRejected, match="manifest digest does not match"):
        read_envelope(tampered, key.public_key())


def test_changed_manifest_with_a_new_digest_fails_the_signature(key: SigningKey) -> None:
    wrapper, manifest = envelope_parts(build_envelope(CONTENT, key))
    tree = manifest_tree(manifest)
    tree[suit.MANIFEST_SEQUENCE_NUMBER] += 1
    forged_manifest = encode_manifest(tree)
    forged_digest = cbor2.dumps(
        [suit.COSE_ALG_SHA256, hashlib.sha256(cbor2.dumps(forged_manifest)).digest()]
    )
    forged = cbor2.dumps(
        cbor2.CBORTag(
            suit.SUIT_ENVELOPE_TAG,
            {
                suit.ENVELOPE_AUTHENTICATION_WRAPPER: cbor2.dumps(
                    [forged_digest, cbor2.dumps(wrapper[1])]
                ),
                suit.ENVELOPE_MANIFEST: forged_manifest,
            },
        )
    )
    with pytest.raises(ArtifactRejected, match="signature does not verify"):
        read_envelope(forged, key.public_key())


def test_changed_signature_fails(key: SigningKey) -> None:
    envelope = build_envelope(CONTENT, key)
    wrapper, _ = envelope_parts(envelope)
    signature = wrapper[1].value[3]
    assert envelope.count(signature) == 1
    flipped = bytes([signature[0] ^ 1]) + signature[1:]
    with pytest.raises(ArtifactRejected, match="signature does not verify"):
        read_envelope(envelope.replace(signature, flipped), key.public_key())


def test_another_key_of_the_same_type_fails(key: SigningKey) -> None:
    envelope = build_envelope(CONTENT, key)
    other = (
        Ed25519PrivateKey.generate()
        if isinstance(key, Ed25519PrivateKey)
        else ec.generate_private_key(ec.SECP256R1())
    )
    with pytest.raises(ArtifactRejected, match="signature does not verify"):
        read_envelope(envelope, other.public_key())


def test_a_key_of_the_other_type_is_refused(
    ed25519_key: Ed25519PrivateKey, p256_key: ec.EllipticCurvePrivateKey
) -> None:
    with pytest.raises(ArtifactRejected, match="trusted key is not P-256"):
        read_envelope(build_envelope(CONTENT, p256_key), ed25519_key.public_key())
    with pytest.raises(ArtifactRejected, match="trusted key is not Ed25519"):
        read_envelope(build_envelope(CONTENT, ed25519_key), p256_key.public_key())


# Hostile input: ArtifactRejected and nothing else.


@pytest.mark.parametrize(
    ("envelope", "problem"),
    [
        (b"", "not valid CBOR"),
        (b"\xff", "not valid CBOR"),
        (b"\x1b\x00", "not valid CBOR"),
        (cbor2.dumps(1), "not a CBOR tag 107"),
        (cbor2.dumps(cbor2.CBORTag(108, {})), "CBOR tag 108"),
        (cbor2.dumps(cbor2.CBORTag(107, [])), "envelope is not a map"),
        (cbor2.dumps(cbor2.CBORTag(107, {})), r"lacks elements \[2, 3\]"),
        (cbor2.dumps(cbor2.CBORTag(107, {True: b"", 3: b""})), "label that is not an integer"),
        (cbor2.dumps(cbor2.CBORTag(107, {2: b"", 3: b"", 4: b""})), r"unsupported elements \[4\]"),
        (cbor2.dumps(cbor2.CBORTag(107, {2: "", 3: b""})), "wrapper is not a byte string"),
        (cbor2.dumps(cbor2.CBORTag(107, {2: b"", 3: b""})), "wrapper is not valid CBOR"),
        (cbor2.dumps(cbor2.CBORTag(107, {2: cbor2.dumps([]), 3: b""})), "lacks the manifest dig"),
        (cbor2.dumps(cbor2.CBORTag(107, {2: cbor2.dumps({}), 3: b""})), "is not an array"),
        (cbor2.dumps(cbor2.CBORTag(1, 0)), "CBOR tag 1,"),
        (b"\xc2\x41\x01", "CBOR tag 2,"),
        (b"\x81" * 1000 + b"\x00", "nests too deeply|not valid CBOR"),
        (cbor2.dumps(cbor2.CBORTag(107, {})) + b"\x00", "bytes after its CBOR item"),
        (b"\x00" * (suit.MAX_ENVELOPE_BYTES + 1), "more than 16384"),
    ],
)
def test_garbage_is_rejected(envelope: bytes, problem: str, ed25519_key: Ed25519PrivateKey) -> None:
    with pytest.raises(ArtifactRejected, match=problem):
        read_envelope(envelope, ed25519_key.public_key())


def test_every_truncation_is_rejected(key: SigningKey) -> None:
    envelope = build_envelope(CONTENT, key)
    for length in range(len(envelope)):
        with pytest.raises(ArtifactRejected):
            read_envelope(envelope[:length], key.public_key())


def test_every_changed_byte_is_rejected(ed25519_key: Ed25519PrivateKey) -> None:
    envelope = build_envelope(CONTENT, ed25519_key)
    for position in range(len(envelope)):
        for flip in (0x01, 0x20, 0x80, 0xFF):
            changed = bytearray(envelope)
            changed[position] ^= flip
            with pytest.raises(ArtifactRejected):
                read_envelope(bytes(changed), ed25519_key.public_key())


def test_random_bytes_are_rejected(ed25519_key: Ed25519PrivateKey) -> None:
    rng = random.Random(20240611)
    prefix = cbor2.dumps(cbor2.CBORTag(suit.SUIT_ENVELOPE_TAG, {}))[:2]
    for _ in range(3000):
        noise = rng.randbytes(rng.randrange(1, 200))
        for candidate in (noise, prefix + noise):
            with pytest.raises(ArtifactRejected):
                read_envelope(candidate, ed25519_key.public_key())


# Signed manifests that break the profile: what a device must not act on.

_OVERRIDE = suit.DIRECTIVE_OVERRIDE_PARAMETERS
SET_URI = [_OVERRIDE, {suit.PARAMETER_URI: CONTENT.uri}]
FETCH = [suit.DIRECTIVE_FETCH, REPORT_FAILURE]
MATCH = [suit.CONDITION_IMAGE_MATCH, REPORT_ALL]
VENDOR_CHECK = [suit.CONDITION_VENDOR_IDENTIFIER, REPORT_ALL]
INVOKE = [suit.DIRECTIVE_INVOKE, REPORT_FAILURE]
SHARED_PARAMETERS = {
    suit.PARAMETER_VENDOR_IDENTIFIER: CONTENT.vendor_id.bytes,
    suit.PARAMETER_CLASS_IDENTIFIER: CONTENT.class_id.bytes,
    suit.PARAMETER_IMAGE_DIGEST: [suit.COSE_ALG_SHA256, IMAGE_SHA256],
    suit.PARAMETER_IMAGE_SIZE: CONTENT.image_size,
}
COMMON = (suit.MANIFEST_COMMON,)
SHARED = (*COMMON, suit.COMMON_SHARED_SEQUENCE)
SHARED_PARAMETER = (*SHARED, 1)
DELETE = object()
REFERENCE_URI = 4  # suit-reference-uri: valid SUIT, but not in this profile
COMPONENT_SLOT = 5  # suit-parameter-component-slot, likewise

BROKEN_MANIFESTS = [
    ((suit.MANIFEST_VERSION,), 2, "manifest version 2 is not supported"),
    ((suit.MANIFEST_SEQUENCE_NUMBER,), -1, "sequence number is negative"),
    ((suit.MANIFEST_SEQUENCE_NUMBER,), True, "sequence number is not an integer"),
    ((REFERENCE_URI,), "coap://x/m", r"manifest has unsupported elements \[4\]"),
    ((suit.MANIFEST_VALIDATE,), DELETE, r"manifest lacks elements \[7\]"),
    (
        (suit.MANIFEST_INSTALL,),
        Raw([suit.COSE_ALG_SHA256, bytes(32)]),  # severed: only its digest is left
        "install sequence is not a byte string",
    ),
    ((*COMMON, suit.COMMON_COMPONENTS), [[b"a"], [b"b"]], "2 components; only one"),
    ((*COMMON, suit.COMMON_COMPONENTS), [["firmware"]], "part is not a byte string"),
    (
        SHARED,
        [_OVERRIDE, SHARED_PARAMETERS, *VENDOR_CHECK],
        "shared sequence does not run condition-class-identifier",
    ),
    (
        (suit.MANIFEST_INSTALL,),
        SET_URI + MATCH + FETCH,
        "install sequence does not run directive-fetch then condition-image-match",
    ),
    (
        (suit.MANIFEST_INSTALL,),
        FETCH + SET_URI + MATCH,
        "runs directive-fetch before parameter 21 is set",
    ),
    (
        (suit.MANIFEST_INSTALL,),
        [_OVERRIDE, {suit.PARAMETER_VENDOR_IDENTIFIER: bytes(16)}, *SET_URI, *FETCH, *MATCH],
        "install sequence sets parameter 1 a second time",
    ),
    (
        (suit.MANIFEST_INSTALL,),
        SET_URI + FETCH + MATCH + INVOKE,
        "install sequence has command directive-invoke, which is not supported there",
    ),
    ((suit.MANIFEST_VALIDATE,), [suit.CONDITION_IMAGE_MATCH], "not a non-empty list"),
    ((suit.MANIFEST_VALIDATE,), [], "not a non-empty list"),
    (
        (suit.MANIFEST_VALIDATE,),
        [suit.CONDITION_IMAGE_MATCH, True],
        "reporting policy of condition-image-match is not an integer",
    ),
    ((suit.MANIFEST_INVOKE,), [suit.DIRECTIVE_INVOKE, -1], "is negative"),
    ((*SHARED_PARAMETER, COMPONENT_SLOT), 0, r"parameters has unsupported elements \[5\]"),
    (
        (*SHARED_PARAMETER, suit.PARAMETER_IMAGE_DIGEST),
        [COSE_ALG_SHA512, bytes(64)],
        f"image digest algorithm {COSE_ALG_SHA512} is not supported",
    ),
    (
        (*SHARED_PARAMETER, suit.PARAMETER_IMAGE_DIGEST),
        [suit.COSE_ALG_SHA256, bytes(31)],
        "image digest has 31 bytes, not 32",
    ),
    ((*SHARED_PARAMETER, suit.PARAMETER_VENDOR_IDENTIFIER), bytes(15), "has 15 bytes, not 16"),
    (
        (*SHARED_PARAMETER, suit.PARAMETER_VENDOR_IDENTIFIER),
        cbor2.CBORTag(CBOR_PEN_TAG, b"\x01"),
        f"CBOR tag {CBOR_PEN_TAG},",
    ),
    (
        (*SHARED_PARAMETER, suit.PARAMETER_IMAGE_SIZE),
        DELETE,
        r"install sequence runs without parameters \[14\]",
    ),
    (
        (*SHARED_PARAMETER, suit.PARAMETER_IMAGE_SIZE),
        -5,
        "image size is negative",
    ),
    (
        (suit.MANIFEST_INSTALL, 1, suit.PARAMETER_URI),
        "/fw /x",
        "URI has characters outside printable ASCII",
    ),
    ((suit.MANIFEST_INSTALL, 1, suit.PARAMETER_URI), b"/fw/x", "URI is not a text string"),
    ((suit.MANIFEST_INSTALL, 1, suit.PARAMETER_URI), "", "URI must have 1 to 1024 characters"),
]


def changed(tree: dict[int, Any], path: tuple[int, ...], value: object) -> dict[int, Any]:
    """`tree` with the item at `path` replaced by `value`, or removed for DELETE."""
    *parents, last = path
    node: Any = tree
    for step in parents:
        node = node[step]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return tree


def signed_tree(key: SigningKey) -> dict[int, Any]:
    _, manifest = envelope_parts(build_envelope(CONTENT, key))
    return manifest_tree(manifest)


@pytest.mark.parametrize(("path", "value", "problem"), BROKEN_MANIFESTS)
def test_signed_manifest_outside_the_profile_is_rejected(
    path: tuple[int, ...], value: object, problem: str, ed25519_key: Ed25519PrivateKey
) -> None:
    manifest = encode_manifest(changed(signed_tree(ed25519_key), path, value))
    with pytest.raises(ArtifactRejected, match=problem):
        read_envelope(sign_manifest(manifest, ed25519_key), ed25519_key.public_key())


def test_signed_manifest_without_invoke_sequence_is_accepted(
    ed25519_key: Ed25519PrivateKey,
) -> None:
    tree = changed(signed_tree(ed25519_key), (suit.MANIFEST_INVOKE,), DELETE)
    envelope = sign_manifest(encode_manifest(tree), ed25519_key)
    assert read_envelope(envelope, ed25519_key.public_key()) == CONTENT


def test_manifest_signed_twice_is_refused(ed25519_key: Ed25519PrivateKey) -> None:
    tagged = cbor2.loads(build_envelope(CONTENT, ed25519_key))
    wrapper = cbor2.loads(tagged.value[suit.ENVELOPE_AUTHENTICATION_WRAPPER])
    doubled = cbor2.dumps([*wrapper, wrapper[1]])
    envelope = cbor2.dumps(
        cbor2.CBORTag(
            suit.SUIT_ENVELOPE_TAG,
            {
                suit.ENVELOPE_AUTHENTICATION_WRAPPER: doubled,
                suit.ENVELOPE_MANIFEST: tagged.value[suit.ENVELOPE_MANIFEST],
            },
        )
    )
    with pytest.raises(ArtifactRejected, match="more than one authentication block"):
        read_envelope(envelope, ed25519_key.public_key())


# What cannot be built.


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"sequence_number": -1}, "sequence number -1 is not a 64-bit uint"),
        ({"sequence_number": 2**64}, "is not a 64-bit uint"),
        ({"image_sha256": bytes(31)}, "image SHA-256 has 31 bytes"),
        ({"image_size": -1}, "image size -1 is not a 64-bit uint"),
        ({"uri": ""}, "URI must have 1 to"),
        ({"uri": "/" * (suit.MAX_URI_LENGTH + 1)}, "URI must have 1 to"),
        ({"uri": "/fw/é"}, "outside printable ASCII"),
        ({"component": (b"",) * (suit.MAX_COMPONENT_SEGMENTS + 1)}, "more than 8 parts"),
        ({"component": (b"x" * 65,)}, "more than 64 bytes"),
    ],
)
def test_content_a_manifest_cannot_hold_is_refused(change: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        replace(CONTENT, **change)


def test_only_p256_ecdsa_keys_sign() -> None:
    with pytest.raises(ValueError, match="P-256"):
        build_envelope(CONTENT, ec.generate_private_key(ec.SECP384R1()))
