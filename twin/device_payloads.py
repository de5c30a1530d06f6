"""Twin documents on the wire to and from devices: JSON (content-format 50) or CBOR (60).

Decoding is strict: a body that does not parse, or does not hold an object, is a 4.00 with
the reason; the patch rules (key syntax, depth, size) are `merge_patch.check_patch`'s.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import cbor2

from twin.errors import InvalidArgument
from twin.merge_patch import Document, check_patch

JSON = 50
CBOR = 60
FORMATS = (JSON, CBOR)
# A device's report is at most this big on the wire, whichever the format.
MAX_REPORT_BYTES = 64 * 1024


def decode_patch(payload: bytes, content_format: int) -> Document:
    """The merge patch in a request body, checked."""
    try:
        if content_format == CBOR:
            value: Any = cbor2.loads(payload)
        else:
            value = json.loads(payload)
    except (ValueError, cbor2.CBORDecodeError, UnicodeDecodeError, RecursionError) as bad:
        name = "CBOR" if content_format == CBOR else "JSON"
        raise InvalidArgument(f"body is not valid {name}: {bad}") from None
    return check_patch(value, max_bytes=MAX_REPORT_BYTES)


def encode_document(document: object, content_format: int) -> bytes:
    """`document` in the given format (compact JSON, or CBOR)."""
    if content_format == CBOR:
        return bytes(cbor2.dumps(document))
    return json.dumps(document, separators=(",", ":"), sort_keys=True).encode()


def etag_of(document: object) -> bytes:
    """An ETag for a document: 8 bytes of the hash of its canonical JSON, so equal documents
    have equal tags whatever the format they are sent in."""
    canonical = json.dumps(document, separators=(",", ":"), sort_keys=True).encode()
    return hashlib.sha256(canonical).digest()[:8]
