"""Signed SUIT manifests (draft-ietf-suit-manifest-34) for the firmware images devices are sent.

For every firmware job the service issues a SUIT envelope that says which devices the image is
for, which image it is and where to get it; the device (our simulator) checks it with
`read_envelope` before it trusts anything in the job. The envelope is built the way the draft's
examples build theirs, with one component and no severed or integrated parts (CBOR diagnostic
notation; << >> is a byte string holding CBOR):

    107({                                         SUIT_Envelope_Tagged
      2: << [                                     authentication-wrapper
        << [-16, h'<sha256 of manifest>'] >>,     SUIT_Digest of the manifest byte string
        << 18([                                   COSE_Sign1_Tagged
          << {1: -7 or -8} >>,                    protected: alg ES256 or EdDSA
          {}, nil,                                unprotected; payload detached
          h'<signature>'                          over the SUIT_Digest above
        ]) >>
      ] >>,
      3: << {                                     manifest
        1: 1,                                     manifest-version
        2: <sequence number>,                     manifest-sequence-number
        3: << {                                   common
          2: [[h'6669726d77617265']],             components: one, ["firmware"]
          4: << [                                 shared-sequence
            20, {1: h'<vendor id>', 2: h'<class id>',            override-parameters
                 3: << [-16, h'<image sha256>'] >>, 14: <size>},
            1, 15,                                condition-vendor-identifier
            2, 15                                 condition-class-identifier
          ] >>
        } >>,
        7: << [3, 15] >>,                         validate: condition-image-match
        9: << [23, 2] >>,                         invoke: directive-invoke
        20: << [20, {21: "<uri>"}, 21, 2, 3, 15] >>    install: set URI, fetch, image-match
      } >>
    })

Why this shape: the vendor and class checks sit in the shared sequence because the draft runs
it before every other sequence, so a device refuses a foreign image before fetching a byte;
the image digest is checked right after the fetch (install) and again before booting
(validate), which is what lets a bootloader trust an image it did not download itself.

The signature covers the manifest only through its digest: the COSE_Sign1 payload is the
SUIT_Digest, left out of the COSE structure (nil) because it is the wrapper's first element,
and that digest is SHA-256 over the manifest byte string including its CBOR head, as the
draft's examples compute it. ECDSA signatures are COSE's raw r || s, not DER.

`read_envelope` reads hostile input: the size is bounded, each CBOR layer is decoded on its own
with only the tags it may hold, every value's type is checked before use, and anything this
profile does not produce (other elements, commands, parameters or algorithms) is refused rather
than ignored, since a device must not act on a manifest it only partly understands. Every
problem raises `ArtifactRejected` naming it.
"""

from __future__ import annotations

import hashlib
import io
import uuid
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Final, TypeAlias

import cbor2
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from twin.errors import ArtifactRejected

SigningKey: TypeAlias = Ed25519PrivateKey | ec.EllipticCurvePrivateKey
VerifyingKey: TypeAlias = Ed25519PublicKey | ec.EllipticCurvePublicKey

# Bounds on what is read. An envelope of this profile is a few hundred bytes; the limits leave
# room for long URIs and component names and keep hostile input cheap to refuse.
MAX_ENVELOPE_BYTES: Final = 16 * 1024
# The vendor citytwin's manifests are made out to (its vendor id is the UUIDv5 of this domain);
# devices compare it with their own.
CITYTWIN_VENDOR_DOMAIN: Final = "citytwin.example"
MAX_URI_LENGTH: Final = 1024
MAX_COMPONENT_SEGMENTS: Final = 8
MAX_COMPONENT_SEGMENT_BYTES: Final = 64
_MAX_UINT: Final = 2**64 - 1

# CBOR tags.
SUIT_ENVELOPE_TAG: Final = 107
COSE_SIGN1_TAG: Final = 18

# SUIT_Envelope elements.
ENVELOPE_AUTHENTICATION_WRAPPER: Final = 2
ENVELOPE_MANIFEST: Final = 3

# SUIT_Manifest elements.
MANIFEST_VERSION: Final = 1
MANIFEST_SEQUENCE_NUMBER: Final = 2
MANIFEST_COMMON: Final = 3
MANIFEST_VALIDATE: Final = 7
MANIFEST_INVOKE: Final = 9
MANIFEST_INSTALL: Final = 20
SUIT_MANIFEST_VERSION: Final = 1

# SUIT_Common elements.
COMMON_COMPONENTS: Final = 2
COMMON_SHARED_SEQUENCE: Final = 4

# SUIT commands: conditions and directives.
CONDITION_VENDOR_IDENTIFIER: Final = 1
CONDITION_CLASS_IDENTIFIER: Final = 2
CONDITION_IMAGE_MATCH: Final = 3
DIRECTIVE_OVERRIDE_PARAMETERS: Final = 20
DIRECTIVE_FETCH: Final = 21
DIRECTIVE_INVOKE: Final = 23

# SUIT parameters.
PARAMETER_VENDOR_IDENTIFIER: Final = 1
PARAMETER_CLASS_IDENTIFIER: Final = 2
PARAMETER_IMAGE_DIGEST: Final = 3
PARAMETER_IMAGE_SIZE: Final = 14
PARAMETER_URI: Final = 21

# SUIT_Rep_Policy bits: which records a command adds to the device's report.
REPORT_RECORD_ON_SUCCESS: Final = 1
REPORT_RECORD_ON_FAILURE: Final = 2
REPORT_SYSINFO_ON_SUCCESS: Final = 4
REPORT_SYSINFO_ON_FAILURE: Final = 8
# The draft's examples report everything about conditions and only failures of directives.
_REPORT_CONDITION: Final = (
    REPORT_RECORD_ON_SUCCESS
    | REPORT_RECORD_ON_FAILURE
    | REPORT_SYSINFO_ON_SUCCESS
    | REPORT_SYSINFO_ON_FAILURE
)
_REPORT_DIRECTIVE: Final = REPORT_RECORD_ON_FAILURE

# COSE (RFC 9052, RFC 9053) header labels and algorithm ids.
COSE_HEADER_ALG: Final = 1
COSE_ALG_ES256: Final = -7
COSE_ALG_EDDSA: Final = -8
COSE_ALG_SHA256: Final = -16
_SIGNATURE1_CONTEXT: Final = "Signature1"
_EMPTY_EXTERNAL_AAD: Final = b""

_SHA256_SIZE: Final = 32
_P256_COORDINATE_SIZE: Final = 32
_SIGNATURE_SIZE: Final = 64  # ES256 (r || s) and Ed25519 alike
_UUID_SIZE: Final = 16

_SUIT_DIGEST_FIELDS: Final = 2  # [algorithm, bytes]
_COSE_SIGN1_FIELDS: Final = 4  # [protected, unprotected, payload, signature]

# CBOR heads (RFC 8949 section 3), as far as scanning for tags needs them.
_MAJOR_BYTES: Final = 2
_MAJOR_TEXT: Final = 3
_MAJOR_TAG: Final = 6
_INFO_1_BYTE_ARGUMENT: Final = 24  # below: the argument is the info itself
_INFO_8_BYTE_ARGUMENT: Final = 27  # 24 to 27: 1, 2, 4 or 8 argument bytes follow

_COMMAND_NAMES: Final[Mapping[int, str]] = {
    CONDITION_VENDOR_IDENTIFIER: "condition-vendor-identifier",
    CONDITION_CLASS_IDENTIFIER: "condition-class-identifier",
    CONDITION_IMAGE_MATCH: "condition-image-match",
    DIRECTIVE_OVERRIDE_PARAMETERS: "directive-override-parameters",
    DIRECTIVE_FETCH: "directive-fetch",
    DIRECTIVE_INVOKE: "directive-invoke",
}

# Which parameter each command reads: it must be set before the command runs.
_PARAMETER_READ_BY: Final[Mapping[int, int]] = {
    CONDITION_VENDOR_IDENTIFIER: PARAMETER_VENDOR_IDENTIFIER,
    CONDITION_CLASS_IDENTIFIER: PARAMETER_CLASS_IDENTIFIER,
    CONDITION_IMAGE_MATCH: PARAMETER_IMAGE_DIGEST,
    DIRECTIVE_FETCH: PARAMETER_URI,
}
_PARAMETERS: Final = frozenset(
    {
        PARAMETER_VENDOR_IDENTIFIER,
        PARAMETER_CLASS_IDENTIFIER,
        PARAMETER_IMAGE_DIGEST,
        PARAMETER_IMAGE_SIZE,
        PARAMETER_URI,
    }
)


@dataclass(frozen=True)
class ManifestContent:
    """What a manifest says about one firmware image, and which devices it is for.

    `vendor_id` and `class_id` are what a device compares with its own (see `vendor_id` and
    `class_id` below); `sequence_number` is the anti-rollback counter, which a device never
    lets go down; `uri` is where the image is fetched, absolute or a path on the connection
    the device already has. Construction raises ValueError for values a manifest cannot hold.
    """

    vendor_id: uuid.UUID
    class_id: uuid.UUID
    sequence_number: int
    image_sha256: bytes
    image_size: int
    uri: str
    component: tuple[bytes, ...] = (b"firmware",)

    def __post_init__(self) -> None:
        if not 0 <= self.sequence_number <= _MAX_UINT:
            raise ValueError(f"sequence number {self.sequence_number} is not a 64-bit uint")
        if len(self.image_sha256) != _SHA256_SIZE:
            raise ValueError(
                f"image SHA-256 has {len(self.image_sha256)} bytes, not {_SHA256_SIZE}"
            )
        if not 0 <= self.image_size <= _MAX_UINT:
            raise ValueError(f"image size {self.image_size} is not a 64-bit uint")
        if not 0 < len(self.uri) <= MAX_URI_LENGTH:
            raise ValueError(f"URI must have 1 to {MAX_URI_LENGTH} characters")
        # A URI is printable ASCII without spaces (RFC 3986); anything else would be a guess
        # at how the device's CoAP stack encodes it.
        if not all("!" <= char <= "~" for char in self.uri):
            raise ValueError("URI has characters outside printable ASCII")
        if len(self.component) > MAX_COMPONENT_SEGMENTS:
            raise ValueError(f"component identifier has more than {MAX_COMPONENT_SEGMENTS} parts")
        if any(len(segment) > MAX_COMPONENT_SEGMENT_BYTES for segment in self.component):
            raise ValueError(
                f"a component identifier part has more than {MAX_COMPONENT_SEGMENT_BYTES} bytes"
            )


def vendor_id(domain: str) -> uuid.UUID:
    """The vendor id the draft recommends: UUIDv5 of the vendor's DNS domain name."""
    return uuid.uuid5(uuid.NAMESPACE_DNS, domain)


def class_id(vendor: uuid.UUID, model: str) -> uuid.UUID:
    """The class id the draft recommends: UUIDv5 of the model name under the vendor id."""
    return uuid.uuid5(vendor, model)


def build_envelope(content: ManifestContent, key: SigningKey) -> bytes:
    """The tagged SUIT_Envelope for `content`, signed with `key` (Ed25519, or ECDSA P-256).

    The algorithm follows the key: EdDSA for Ed25519, ES256 for P-256. Maps are encoded in
    CBOR's deterministic key order. Raises ValueError for an EC key on another curve.
    """
    algorithm = _signing_algorithm(key)
    manifest = _dumps(_manifest(content))
    suit_digest = _dumps([COSE_ALG_SHA256, _manifest_digest(manifest)])
    protected = _dumps({COSE_HEADER_ALG: algorithm})
    signature = _sign(key, _signature_input(protected, suit_digest))
    sign1 = _dumps(cbor2.CBORTag(COSE_SIGN1_TAG, [protected, {}, None, signature]))
    authentication = _dumps([suit_digest, sign1])
    envelope = {ENVELOPE_AUTHENTICATION_WRAPPER: authentication, ENVELOPE_MANIFEST: manifest}
    return _dumps(cbor2.CBORTag(SUIT_ENVELOPE_TAG, envelope))


def read_envelope(envelope: bytes, public_key: VerifyingKey) -> ManifestContent:
    """The content of a tagged SUIT_Envelope, once it is shown to be signed by `public_key`.

    Checks, in order: the size and structure of the envelope, that the manifest digest matches
    the manifest byte string, that the COSE_Sign1 signature over that digest verifies, and
    only then the manifest itself. Raises `ArtifactRejected` naming the first problem found.
    """
    if len(envelope) > MAX_ENVELOPE_BYTES:
        raise _rejected(f"envelope has {len(envelope)} bytes, more than {MAX_ENVELOPE_BYTES}")
    tagged = _decode(envelope, "envelope", frozenset({SUIT_ENVELOPE_TAG}))
    if not isinstance(tagged, cbor2.CBORTag) or tagged.tag != SUIT_ENVELOPE_TAG:
        raise _rejected(f"envelope is not a CBOR tag {SUIT_ENVELOPE_TAG} (SUIT_Envelope)")
    elements = _map(
        tagged.value,
        "envelope",
        required={ENVELOPE_AUTHENTICATION_WRAPPER, ENVELOPE_MANIFEST},
    )
    manifest = _bstr(elements[ENVELOPE_MANIFEST], "manifest")
    wrapper = _bstr(elements[ENVELOPE_AUTHENTICATION_WRAPPER], "authentication wrapper")
    authentication = _array(_decode(wrapper, "authentication wrapper"), "authentication wrapper")
    if not authentication:
        raise _rejected("authentication wrapper lacks the manifest digest")
    digest_item, *blocks = authentication
    if not blocks:
        raise _rejected("envelope is not signed (no authentication block)")
    if len(blocks) > 1:
        raise _rejected("more than one authentication block is not supported")
    suit_digest = _bstr(digest_item, "manifest digest")
    _check_manifest_digest(suit_digest, manifest)
    _verify(_bstr(blocks[0], "authentication block"), suit_digest, public_key)
    return _content(manifest)


def _manifest(content: ManifestContent) -> dict[int, object]:
    image_digest = _dumps([COSE_ALG_SHA256, content.image_sha256])
    shared = [
        DIRECTIVE_OVERRIDE_PARAMETERS,
        {
            PARAMETER_VENDOR_IDENTIFIER: content.vendor_id.bytes,
            PARAMETER_CLASS_IDENTIFIER: content.class_id.bytes,
            PARAMETER_IMAGE_DIGEST: image_digest,
            PARAMETER_IMAGE_SIZE: content.image_size,
        },
        CONDITION_VENDOR_IDENTIFIER,
        _REPORT_CONDITION,
        CONDITION_CLASS_IDENTIFIER,
        _REPORT_CONDITION,
    ]
    common = {COMMON_COMPONENTS: [list(content.component)], COMMON_SHARED_SEQUENCE: _dumps(shared)}
    install = [
        DIRECTIVE_OVERRIDE_PARAMETERS,
        {PARAMETER_URI: content.uri},
        DIRECTIVE_FETCH,
        _REPORT_DIRECTIVE,
        CONDITION_IMAGE_MATCH,
        _REPORT_CONDITION,
    ]
    return {
        MANIFEST_VERSION: SUIT_MANIFEST_VERSION,
        MANIFEST_SEQUENCE_NUMBER: content.sequence_number,
        MANIFEST_COMMON: _dumps(common),
        MANIFEST_VALIDATE: _dumps([CONDITION_IMAGE_MATCH, _REPORT_CONDITION]),
        MANIFEST_INVOKE: _dumps([DIRECTIVE_INVOKE, _REPORT_DIRECTIVE]),
        MANIFEST_INSTALL: _dumps(install),
    }


def _dumps(value: object) -> bytes:
    return cbor2.dumps(value, canonical=True)


def _manifest_digest(manifest: bytes) -> bytes:
    # Over the byte string as the envelope holds it, head included. cbor2 writes the shortest
    # head (CBOR's preferred serialization), so a manifest sent with a longer one fails.
    return hashlib.sha256(cbor2.dumps(manifest)).digest()


def _signature_input(protected: bytes, suit_digest: bytes) -> bytes:
    # RFC 9052 Sig_structure, with the detached payload supplied: the SUIT_Digest bytes.
    return _dumps([_SIGNATURE1_CONTEXT, protected, _EMPTY_EXTERNAL_AAD, suit_digest])


def _signing_algorithm(key: SigningKey) -> int:
    if isinstance(key, Ed25519PrivateKey):
        return COSE_ALG_EDDSA
    if not isinstance(key.curve, ec.SECP256R1):
        raise ValueError(f"ES256 needs a P-256 key, not {key.curve.name}")
    return COSE_ALG_ES256


def _sign(key: SigningKey, message: bytes) -> bytes:
    if isinstance(key, Ed25519PrivateKey):
        return key.sign(message)
    r, s = decode_dss_signature(key.sign(message, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(_P256_COORDINATE_SIZE, "big") + s.to_bytes(_P256_COORDINATE_SIZE, "big")


def _rejected(problem: str) -> ArtifactRejected:
    return ArtifactRejected(f"SUIT: {problem}")


def _check_manifest_digest(suit_digest: bytes, manifest: bytes) -> None:
    digest = _sha256_digest(_decode(suit_digest, "manifest digest"), "manifest digest")
    if digest != _manifest_digest(manifest):
        raise _rejected("manifest digest does not match the manifest")


def _sha256_digest(value: object, what: str) -> bytes:
    """The bytes of a SUIT_Digest, refused unless it is a SHA-256 one."""
    fields = _array(value, what)
    if len(fields) != _SUIT_DIGEST_FIELDS:
        raise _rejected(f"{what} is not an [algorithm, bytes] pair")
    algorithm = _int(fields[0], f"{what} algorithm")
    if algorithm != COSE_ALG_SHA256:
        raise _rejected(
            f"{what} algorithm {algorithm} is not supported (only SHA-256, {COSE_ALG_SHA256})"
        )
    digest = _bstr(fields[1], what)
    if len(digest) != _SHA256_SIZE:
        raise _rejected(f"{what} has {len(digest)} bytes, not {_SHA256_SIZE}")
    return digest


def _verify(block: bytes, suit_digest: bytes, public_key: VerifyingKey) -> None:
    tagged = _decode(block, "authentication block", frozenset({COSE_SIGN1_TAG}))
    if not isinstance(tagged, cbor2.CBORTag) or tagged.tag != COSE_SIGN1_TAG:
        raise _rejected(f"authentication block is not a CBOR tag {COSE_SIGN1_TAG} (COSE_Sign1)")
    fields = _array(tagged.value, "COSE_Sign1")
    if len(fields) != _COSE_SIGN1_FIELDS:
        raise _rejected(f"COSE_Sign1 does not have {_COSE_SIGN1_FIELDS} fields")
    protected_bytes = _bstr(fields[0], "COSE protected header")
    # Only the algorithm is understood, so any other protected header (crit, say) is refused.
    protected = _map(
        _decode(protected_bytes, "COSE protected header"),
        "COSE protected header",
        required={COSE_HEADER_ALG},
    )
    # The unprotected header is neither signed nor used; only its type is checked.
    if not isinstance(fields[1], Mapping):
        raise _rejected("COSE unprotected header is not a map")
    if fields[2] is not None:
        raise _rejected("COSE_Sign1 payload is not detached (nil)")
    signature = _bstr(fields[3], "COSE signature")
    algorithm = _int(protected[COSE_HEADER_ALG], "COSE algorithm")
    if algorithm == COSE_ALG_EDDSA:
        if not isinstance(public_key, Ed25519PublicKey):
            raise _rejected("manifest is signed with EdDSA but the trusted key is not Ed25519")
    elif algorithm == COSE_ALG_ES256:
        if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
            public_key.curve, ec.SECP256R1
        ):
            raise _rejected("manifest is signed with ES256 but the trusted key is not P-256")
    else:
        raise _rejected(
            f"signature algorithm {algorithm} is not supported "
            f"(only ES256, {COSE_ALG_ES256}, and EdDSA, {COSE_ALG_EDDSA})"
        )
    if len(signature) != _SIGNATURE_SIZE:
        raise _rejected(f"signature has {len(signature)} bytes, not {_SIGNATURE_SIZE}")
    message = _signature_input(protected_bytes, suit_digest)
    try:
        if isinstance(public_key, Ed25519PublicKey):
            public_key.verify(signature, message)
        else:
            r = int.from_bytes(signature[:_P256_COORDINATE_SIZE], "big")
            s = int.from_bytes(signature[_P256_COORDINATE_SIZE:], "big")
            public_key.verify(encode_dss_signature(r, s), message, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise _rejected("signature does not verify with the trusted key") from None


def _content(manifest_bytes: bytes) -> ManifestContent:
    manifest = _map(
        _decode(manifest_bytes, "manifest"),
        "manifest",
        required={
            MANIFEST_VERSION,
            MANIFEST_SEQUENCE_NUMBER,
            MANIFEST_COMMON,
            MANIFEST_VALIDATE,
            MANIFEST_INSTALL,
        },
        optional={MANIFEST_INVOKE},
    )
    version = _uint(manifest[MANIFEST_VERSION], "manifest version")
    if version != SUIT_MANIFEST_VERSION:
        raise _rejected(f"manifest version {version} is not supported")
    common = _map(
        _decode(_bstr(manifest[MANIFEST_COMMON], "common"), "common"),
        "common",
        required={COMMON_COMPONENTS, COMMON_SHARED_SEQUENCE},
    )
    components = _array(common[COMMON_COMPONENTS], "components")
    if len(components) != 1:
        raise _rejected(f"manifest has {len(components)} components; only one is supported")
    component = tuple(
        _bstr(part, "component identifier part")
        for part in _array(components[0], "component identifier")
    )

    # The draft runs the shared sequence at the start of every other one, so each sequence
    # starts from the parameters the shared one sets, and sees none that the others set.
    shared, done = _run(
        common[COMMON_SHARED_SEQUENCE],
        "shared sequence",
        {DIRECTIVE_OVERRIDE_PARAMETERS, CONDITION_VENDOR_IDENTIFIER, CONDITION_CLASS_IDENTIFIER},
        {},
    )
    _require(done, [CONDITION_VENDOR_IDENTIFIER], "shared sequence")
    _require(done, [CONDITION_CLASS_IDENTIFIER], "shared sequence")
    install, done = _run(
        manifest[MANIFEST_INSTALL],
        "install sequence",
        {DIRECTIVE_OVERRIDE_PARAMETERS, DIRECTIVE_FETCH, CONDITION_IMAGE_MATCH},
        shared,
    )
    _require(done, [DIRECTIVE_FETCH, CONDITION_IMAGE_MATCH], "install sequence")
    _, done = _run(
        manifest[MANIFEST_VALIDATE], "validate sequence", {CONDITION_IMAGE_MATCH}, shared
    )
    _require(done, [CONDITION_IMAGE_MATCH], "validate sequence")
    # SUIT makes invocation optional (a data component is never invoked), so a manifest from
    # another tool may leave it out; when present it may only invoke.
    if MANIFEST_INVOKE in manifest:
        _, done = _run(manifest[MANIFEST_INVOKE], "invoke sequence", {DIRECTIVE_INVOKE}, shared)
        _require(done, [DIRECTIVE_INVOKE], "invoke sequence")

    missing = sorted(_PARAMETERS - install.keys())
    if missing:
        raise _rejected(f"install sequence runs without parameters {missing}")
    image_digest = _bstr(install[PARAMETER_IMAGE_DIGEST], "image digest")
    try:
        return ManifestContent(
            vendor_id=uuid.UUID(bytes=_uuid(install[PARAMETER_VENDOR_IDENTIFIER], "vendor id")),
            class_id=uuid.UUID(bytes=_uuid(install[PARAMETER_CLASS_IDENTIFIER], "class id")),
            sequence_number=_uint(manifest[MANIFEST_SEQUENCE_NUMBER], "sequence number"),
            image_sha256=_sha256_digest(_decode(image_digest, "image digest"), "image digest"),
            image_size=_uint(install[PARAMETER_IMAGE_SIZE], "image size"),
            uri=_tstr(install[PARAMETER_URI], "URI"),
            component=component,
        )
    except ValueError as error:
        raise _rejected(str(error)) from None


def _run(
    sequence: object, what: str, allowed: AbstractSet[int], inherited: Mapping[int, object]
) -> tuple[dict[int, object], list[int]]:
    """Walk a command sequence: the parameters in force after it, and its other commands.

    Only `allowed` commands may appear, a parameter is set at most once (so what the device
    acts on is never a matter of which setting wins), and a command may only run once the
    parameter it reads is set.
    """
    commands = _array(_decode(_bstr(sequence, what), what), what)
    if not commands or len(commands) % 2:
        raise _rejected(f"{what} is not a non-empty list of command and argument pairs")
    parameters = dict(inherited)
    done: list[int] = []
    for command_value, argument in zip(commands[::2], commands[1::2], strict=True):
        command = _int(command_value, f"{what} command")
        name = _COMMAND_NAMES.get(command, str(command))
        if command not in allowed:
            raise _rejected(f"{what} has command {name}, which is not supported there")
        if command == DIRECTIVE_OVERRIDE_PARAMETERS:
            for label, value in _map(argument, f"{what} parameters", optional=_PARAMETERS).items():
                if label in parameters:
                    raise _rejected(f"{what} sets parameter {label} a second time")
                parameters[label] = value
            continue
        _uint(argument, f"{what} reporting policy of {name}")
        needed = _PARAMETER_READ_BY.get(command)
        if needed is not None and needed not in parameters:
            raise _rejected(f"{what} runs {name} before parameter {needed} is set")
        done.append(command)
    return parameters, done


def _require(done: Sequence[int], commands: Sequence[int], what: str) -> None:
    """Refuse unless `done` runs `commands` in this order (other commands may come between)."""
    remaining = iter(done)
    for command in commands:
        # `in` consumes the iterator up to the match, so each search starts after the last.
        if command not in remaining:
            names = " then ".join(_COMMAND_NAMES[step] for step in commands)
            raise _rejected(f"{what} does not run {names}")


def _decode(data: bytes, what: str, tags: frozenset[int] = frozenset()) -> object:
    """The one CBOR item in `data`, which may use only the CBOR `tags` given."""
    _check_tags(data, what, tags)
    stream = io.BytesIO(data)
    try:
        value = cbor2.CBORDecoder(stream).decode()
    except RecursionError:
        raise _rejected(f"{what} nests too deeply") from None
    # CBORDecodeError is a ValueError in cbor2 5 but not in 6.
    except (cbor2.CBORDecodeError, ValueError, OverflowError) as error:
        raise _rejected(f"{what} is not valid CBOR ({error})") from None
    if stream.tell() != len(data):
        raise _rejected(f"{what} has bytes after its CBOR item")
    return value


def _check_tags(data: bytes, what: str, allowed: frozenset[int]) -> None:
    """Refuse any CBOR tag but `allowed` before cbor2 decodes `data`.

    cbor2 turns many tags into Python objects (datetimes, bignums, shared references, ...),
    which no manifest holds and some of which fail in ways of their own. Well-formed CBOR is a
    flat sequence of heads (a float's bits count as its head's argument) and string bodies, so
    reading heads in order and skipping string bodies finds every tag of this layer; nested
    layers are byte strings, checked when they are decoded. Malformed input is left to cbor2.
    """
    position, end = 0, len(data)
    while position < end:
        initial = data[position]
        position += 1
        major, info = initial >> 5, initial & 0x1F
        if info < _INFO_1_BYTE_ARGUMENT:
            argument = info
        elif info <= _INFO_8_BYTE_ARGUMENT:
            size = 1 << (info - _INFO_1_BYTE_ARGUMENT)
            argument = int.from_bytes(data[position : position + size], "big")
            position += size
        else:
            # Indefinite length, break, or reserved (malformed): no argument follows.
            continue
        if major in (_MAJOR_BYTES, _MAJOR_TEXT):
            position += argument
        elif major == _MAJOR_TAG and argument not in allowed:
            raise _rejected(f"{what} has CBOR tag {argument}, which it may not hold")


def _map(
    value: object,
    what: str,
    *,
    required: AbstractSet[int] = frozenset(),
    optional: AbstractSet[int] = frozenset(),
) -> Mapping[int, object]:
    """`value` as a map whose labels are integers: all `required` ones, and `optional` ones."""
    # cbor2 6 decodes what a tag holds into immutable types: frozendict, and tuple for arrays.
    if not isinstance(value, Mapping):
        raise _rejected(f"{what} is not a map")
    # bool and float keys would compare equal to integer labels (True == 1 == 1.0).
    if any(type(label) is not int for label in value):
        raise _rejected(f"{what} has a label that is not an integer")
    unknown = sorted(value.keys() - required - optional)
    if unknown:
        raise _rejected(f"{what} has unsupported elements {unknown}")
    missing = sorted(required - value.keys())
    if missing:
        raise _rejected(f"{what} lacks elements {missing}")
    return value


def _array(value: object, what: str) -> Sequence[object]:
    if not isinstance(value, list | tuple):
        raise _rejected(f"{what} is not an array")
    return value


def _bstr(value: object, what: str) -> bytes:
    if not isinstance(value, bytes):
        raise _rejected(f"{what} is not a byte string")
    return value


def _tstr(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise _rejected(f"{what} is not a text string")
    return value


def _int(value: object, what: str) -> int:
    # bool is an int subclass in Python, but CBOR true is not the integer 1.
    if type(value) is not int:
        raise _rejected(f"{what} is not an integer")
    return value


def _uint(value: object, what: str) -> int:
    number = _int(value, what)
    if number < 0:
        raise _rejected(f"{what} is negative")
    return number


def _uuid(value: object, what: str) -> bytes:
    data = _bstr(value, what)
    if len(data) != _UUID_SIZE:
        raise _rejected(f"{what} has {len(data)} bytes, not {_UUID_SIZE} (a UUID)")
    return data
