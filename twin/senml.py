"""SenML (RFC 8428) telemetry packs decoded into resolved measurements.

Devices send measurements as SenML packs in JSON (content-format 110) or CBOR (112). This
module turns such a payload into resolved records (RFC 8428 section 4.6: base fields applied,
absolute UTC times), picks the latest measurement per name and builds the merge patch that puts
those into a twin's reported state.

Everything here is pure: bytes and plain values in, new plain values out; no I/O, no clock (the
caller passes "now", which relative SenML times count from). Every problem with the input is a
SenmlError whose message names the 0-based record index where there is one, so the device can
be told what to fix.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Final, TypeAlias

import cbor2

from twin.merge_patch import Document

SENML_JSON: Final = 110
SENML_CBOR: Final = 112
CONTENT_FORMATS: Final = frozenset({SENML_JSON, SENML_CBOR})

SUPPORTED_VERSION: Final = 10
MAX_RECORDS: Final = 500
MAX_NAME_LENGTH: Final = 128
# RFC 8428 section 4.5.3: resolved times below 2**28 (about 8.5 years) count from "now".
RELATIVE_TIME_LIMIT: Final = 2**28

# RFC 8428 table 6. The table is closed (extensions use text labels), so an integer label
# not listed here is an unknown field like any other.
_CBOR_LABELS: Final[Mapping[str | int, str]] = {
    -1: "bver",
    -2: "bn",
    -3: "bt",
    -4: "bu",
    -5: "bv",
    -6: "bs",
    0: "n",
    1: "u",
    2: "v",
    3: "vs",
    4: "vb",
    5: "s",
    6: "t",
    7: "ut",
    8: "vd",
}
_JSON_LABELS: Final[Mapping[str | int, str]] = {name: name for name in _CBOR_LABELS.values()}
_BASE_LABELS: Final = frozenset({"bver", "bn", "bt", "bu", "bv", "bs"})
# RFC 8428 section 4.5.1; re.fullmatch, so no anchors are needed (and `$` would allow "\n").
_NAME_CHARACTERS: Final = re.compile(r"[A-Za-z0-9:./_-]*")
_NAME_START: Final = re.compile(r"[A-Za-z0-9]")
# Padding is omitted by the RFC but tolerated: many base64 encoders add it by default.
_BASE64URL: Final = re.compile(r"[A-Za-z0-9_-]*={0,2}")
# Decimal fractions (tag 4) are the only CBOR tag RFC 8428 gives a meaning to.
_ALLOWED_CBOR_TAGS: Final = frozenset({4})

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
# 10000-01-01T00:00:00Z, which datetime cannot represent.
_YEAR_10000: Final = 253402300800


class SenmlError(ValueError):
    """The payload is not an acceptable SenML pack; the message says why (and where)."""


@dataclass(frozen=True, slots=True)
class Measurement:
    """One resolved SenML record.

    `value` is a float (v), str (vs), bool (vb), bytes (vd), or None for a record that only
    carries a sum. `time` is an aware UTC datetime; `update_time` is the record's `ut` in
    seconds, if any.
    """

    name: str
    unit: str | None
    value: float | str | bool | bytes | None
    sum: float | None
    time: datetime
    update_time: float | None


def decode_pack(
    payload: bytes, content_format: int, *, now: datetime, max_records: int = MAX_RECORDS
) -> list[Measurement]:
    """The resolved measurements of a SenML pack, in pack order.

    `content_format` is 110 (application/senml+json) or 112 (application/senml+cbor). `now`, an
    aware datetime, is the instant relative times (below 2**28 s) count from; a naive one is a
    ValueError, not a SenmlError, being the caller's mistake rather than the device's.

    Records carrying only base fields (such as `[{"bn": "dev:"}, ...]` in RFC 8428 section
    5.1.7) set context for the records after them and yield no measurement. Everything wrong
    with the payload, including more than `max_records` records, raises SenmlError.
    """
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("decode_pack needs an aware datetime for now")
    if content_format == SENML_JSON:
        pack = _load_json(payload)
        labels = _JSON_LABELS
        cbor = False
    elif content_format == SENML_CBOR:
        pack = _load_cbor(payload)
        labels = _CBOR_LABELS
        cbor = True
    else:
        raise SenmlError(
            f"content-format {content_format} is neither SenML JSON ({SENML_JSON}) "
            f"nor SenML CBOR ({SENML_CBOR})"
        )
    if not isinstance(pack, list):
        raise SenmlError("not SenML: expected an array of records")
    if not pack:
        raise SenmlError("not SenML: the pack has no records")
    if len(pack) > max_records:
        raise SenmlError(f"the pack has {len(pack)} records; the limit is {max_records}")
    return _resolve(pack, labels, cbor=cbor, now=now.astimezone(UTC))


def latest_values(measurements: Iterable[Measurement]) -> dict[str, Measurement]:
    """The newest measurement of each name; of equally new ones, the later in the input wins.

    Names are keyed in the order they first appear. Note that only the name counts: records
    told apart by unit alone (as in RFC 8428 section 5.1.3) replace one another.
    """
    latest: dict[str, Measurement] = {}
    for measurement in measurements:
        current = latest.get(measurement.name)
        if current is None or measurement.time >= current.time:
            latest[measurement.name] = measurement
    return latest


def reported_patch(latest: Mapping[str, Measurement]) -> Document:
    """A JSON merge patch setting each measurement's property in the reported state to its
    latest value: a measurement is named after the profile property it measures, with dots
    for nesting (`noise_db`, `energy.total_wh` -> `{"energy": {"total_wh": ...}}`), so the
    profile validates it like any report. Sum-only records contribute their sum.

    SenmlError for a name that is not a property path (empty or `[` `]` parts), for a data
    value (bytes have no place in a twin), or for a name that is both a value and a prefix of
    another name in the same pack.
    """
    patch: Document = {}
    for name, measurement in latest.items():
        parts = name.split(".")
        if any(not part or "[" in part or "]" in part for part in parts):
            raise SenmlError(f"measurement {name!r} does not name a property")
        value = measurement.value if measurement.value is not None else measurement.sum
        if isinstance(value, bytes):
            raise SenmlError(f"measurement {name!r}: data values cannot be stored in a twin")
        node = patch
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise SenmlError(f"measurement {name!r} nests under another measurement's value")
            node = child
        if isinstance(node.get(parts[-1]), dict):
            raise SenmlError(f"measurement {name!r} is also the prefix of another measurement")
        node[parts[-1]] = value
    return patch


class _RepeatedLabel:
    """Stands in for a JSON object that names a member twice (json would keep the last one)."""

    def __init__(self, label: str) -> None:
        self.label = label


def _json_object(pairs: list[tuple[str, object]]) -> dict[str, object] | _RepeatedLabel:
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            return _RepeatedLabel(key)
        result[key] = value
    return result


def _load_json(payload: bytes) -> object:
    try:
        # Decoded here rather than by json.loads, which would also accept UTF-16 and UTF-32.
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise SenmlError("not SenML: the JSON is not UTF-8") from None
    try:
        # NaN and Infinity parse (json's default) so that the record check can name the record.
        return json.loads(text, object_pairs_hook=_json_object)
    except RecursionError:
        raise SenmlError("not SenML: the JSON nests too deeply") from None
    except ValueError as exc:
        raise SenmlError(f"not SenML: invalid JSON ({exc})") from None


def _load_cbor(payload: bytes) -> object:
    _check_cbor_tags(payload)
    stream = io.BytesIO(payload)
    try:
        pack = cbor2.CBORDecoder(stream).decode()
    except RecursionError:
        raise SenmlError("not SenML: the CBOR nests too deeply") from None
    # CBORDecodeError is a ValueError in cbor2 5 but not in 6.
    except (cbor2.CBORDecodeError, ValueError, OverflowError) as exc:
        raise SenmlError(f"not SenML: invalid CBOR ({exc})") from None
    if stream.tell() != len(payload):
        raise SenmlError("not SenML: bytes follow the CBOR array")
    return pack


def _check_cbor_tags(payload: bytes) -> None:
    """Reject any CBOR tag but a decimal fraction before cbor2 decodes the payload.

    cbor2 turns tags into datetimes, regular expressions, MIME messages, shared references and
    bignums, none of which means anything in SenML and some of which cost time quadratic in
    their size. Well-formed CBOR is a flat sequence of heads (a float's bits count as its
    head's argument) and string bodies, so reading heads in order and skipping string bodies
    finds every tag without tracking arrays or maps; anything malformed is left to cbor2.
    """
    position, end = 0, len(payload)
    while position < end:
        initial = payload[position]
        position += 1
        major, info = initial >> 5, initial & 0x1F
        if info < 24:
            argument = info
        elif info <= 27:
            size = 1 << (info - 24)
            argument = int.from_bytes(payload[position : position + size], "big")
            position += size
        else:
            # Indefinite length, break, or reserved (malformed): no argument follows.
            continue
        if major in (2, 3):
            position += argument
        elif major == 6 and argument not in _ALLOWED_CBOR_TAGS:
            raise SenmlError(f"not SenML: CBOR tag {argument} has no meaning in SenML")


_Value: TypeAlias = float | str | bool | bytes


@dataclass(frozen=True, slots=True)
class _Record:
    """One record's known fields, type-checked; None where a field is absent."""

    version: int | None
    base_name: str | None
    base_time: float | None
    base_unit: str | None
    base_value: float | None
    base_sum: float | None
    name: str | None
    unit: str | None
    # Label (v, vs, vb, vd) to value, in that order: more than one is an error found later.
    values: dict[str, _Value]
    sum: float | None
    time: float | None
    update_time: float | None
    has_regular_fields: bool


@dataclass(slots=True)
class _Base:
    """The base fields in force at a record (RFC 8428 section 4.1)."""

    name: str = ""
    time: float = 0.0
    unit: str | None = None
    value: float = 0.0
    sum: float | None = None
    version: int = SUPPORTED_VERSION


def _resolve(
    pack: list[object], labels: Mapping[str | int, str], *, cbor: bool, now: datetime
) -> list[Measurement]:
    base = _Base()
    measurements: list[Measurement] = []
    for index, raw in enumerate(pack):
        record = _record(index, raw, labels, cbor=cbor)
        _apply_base(index, record, base)
        if record.has_regular_fields:
            measurements.append(_measurement(index, record, base, now))
    return measurements


def _record(index: int, raw: object, labels: Mapping[str | int, str], *, cbor: bool) -> _Record:
    fields = _labelled(index, raw, labels, cbor=cbor)

    def number(label: str) -> float | None:
        return _number(index, label, fields[label]) if label in fields else None

    def string(label: str) -> str | None:
        if label not in fields:
            return None
        value = fields[label]
        if not isinstance(value, str):
            raise SenmlError(f"record {index}: {label} must be a string")
        return value

    values: dict[str, _Value] = {}
    if "v" in fields:
        values["v"] = _number(index, "v", fields["v"])
    text = string("vs")
    if text is not None:
        values["vs"] = text
    if "vb" in fields:
        if not isinstance(fields["vb"], bool):
            raise SenmlError(f"record {index}: vb must be a boolean")
        values["vb"] = fields["vb"]
    if "vd" in fields:
        values["vd"] = _data_value(index, fields["vd"], cbor=cbor)
    return _Record(
        version=_version(index, fields["bver"]) if "bver" in fields else None,
        base_name=string("bn"),
        base_time=number("bt"),
        base_unit=string("bu"),
        base_value=number("bv"),
        base_sum=number("bs"),
        name=string("n"),
        unit=string("u"),
        values=values,
        sum=number("s"),
        time=number("t"),
        update_time=number("ut"),
        has_regular_fields=not fields.keys() <= _BASE_LABELS,
    )


def _labelled(
    index: int, raw: object, labels: Mapping[str | int, str], *, cbor: bool
) -> dict[str, object]:
    """The record's known fields by label name, unchecked."""
    if isinstance(raw, _RepeatedLabel):
        raise SenmlError(f"record {index}: label {_show(raw.label)} appears more than once")
    if not isinstance(raw, Mapping):
        raise SenmlError(f"record {index}: expected a {'CBOR map' if cbor else 'JSON object'}")
    fields: dict[str, object] = {}
    for key, value in raw.items():
        # `type(...) is int`, not isinstance: True == 1 would otherwise find the unit label.
        if not (isinstance(key, str) or type(key) is int):
            raise SenmlError(f"record {index}: a label is a {type(key).__name__}")
        label = labels.get(key)
        if label is not None:
            fields[label] = value
        # RFC 8428 section 4.4: unknown fields are ignored unless their label ends in "_".
        elif isinstance(key, str) and key.endswith("_"):
            raise SenmlError(
                f"record {index}: label {_show(key)} must be understood and is not supported"
            )
    return fields


def _number(index: int, label: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | Decimal):
        raise SenmlError(f"record {index}: {label} must be a number")
    try:
        number = float(value)
    except (OverflowError, ValueError):  # an int beyond float range; a signalling NaN
        number = math.nan
    if not math.isfinite(number):
        raise SenmlError(f"record {index}: {label} is not a finite number")
    return number


def _data_value(index: int, value: object, *, cbor: bool) -> bytes:
    if cbor:
        if not isinstance(value, bytes):
            raise SenmlError(f"record {index}: vd must be a byte string")
        return value
    if not isinstance(value, str):
        raise SenmlError(f"record {index}: vd must be a base64url string")
    text = value.rstrip("=")
    if _BASE64URL.fullmatch(value) is None or len(text) % 4 == 1:
        raise SenmlError(f"record {index}: vd is not valid base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _version(index: int, value: object) -> int:
    # JSON has only numbers, so 10.0 is taken as 10; CBOR integers arrive as int anyway.
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SenmlError(f"record {index}: bver must be a positive integer")
    if value > SUPPORTED_VERSION:
        raise SenmlError(
            f"record {index}: SenML version {value} is newer than the supported "
            f"version {SUPPORTED_VERSION}"
        )
    return value


def _apply_base(index: int, record: _Record, base: _Base) -> None:
    """Update `base` with the record's base fields, which apply to the record itself too."""
    if record.version is not None:
        # All records of a pack have one version (section 4.4); before any bver it is 10.
        if index > 0 and record.version != base.version:
            raise SenmlError(
                f"record {index}: bver {record.version} differs from the pack's "
                f"version {base.version}"
            )
        base.version = record.version
    if record.base_name is not None:
        base.name = record.base_name
    if record.base_time is not None:
        base.time = record.base_time
    if record.base_unit is not None:
        base.unit = record.base_unit
    if record.base_value is not None:
        base.value = record.base_value
    if record.base_sum is not None:
        base.sum = record.base_sum


def _measurement(index: int, record: _Record, base: _Base, now: datetime) -> Measurement:
    name = base.name + (record.name or "")
    _check_name(index, name)

    if len(record.values) > 1:
        raise SenmlError(f"record {index}: more than one value ({', '.join(record.values)})")
    # Section 4.5.4: a missing sum or base sum counts as zero, but with neither there is none.
    total: float | None = None
    if record.sum is not None or base.sum is not None:
        total = _finite(index, "bs + s", (base.sum or 0.0) + (record.sum or 0.0))
    if not record.values and total is None:
        raise SenmlError(f"record {index}: no value")
    value = next(iter(record.values.values()), None)
    if isinstance(value, float):
        # Only v is a float, and the base value applies to it alone: vs, vb and vd are no sums.
        value = _finite(index, "bv + v", base.value + value)

    if record.update_time is not None and record.update_time < 0:
        raise SenmlError(f"record {index}: ut must not be negative")
    time = _time(index, base.time + (record.time or 0.0), now)
    unit = record.unit if record.unit is not None else base.unit
    return Measurement(name, unit, value, total, time, record.update_time)


def _check_name(index: int, name: str) -> None:
    if not name:
        raise SenmlError(f"record {index}: no name (neither bn nor n)")
    if len(name) > MAX_NAME_LENGTH:
        raise SenmlError(
            f"record {index}: name is {len(name)} characters long; the limit is {MAX_NAME_LENGTH}"
        )
    if _NAME_CHARACTERS.fullmatch(name) is None:
        raise SenmlError(f"record {index}: name {name!r} has characters SenML does not allow")
    if _NAME_START.match(name) is None:
        raise SenmlError(f"record {index}: name {name!r} does not start with a letter or digit")


def _time(index: int, seconds: float, now: datetime) -> datetime:
    """The instant a resolved SenML time (base time + time) stands for."""
    seconds = _finite(index, "bt + t", seconds)
    if seconds >= _YEAR_10000:
        raise SenmlError(f"record {index}: time {seconds!r} is beyond the year 9999")
    try:
        if seconds < RELATIVE_TIME_LIMIT:
            return now + timedelta(seconds=seconds)
        return _EPOCH + timedelta(seconds=seconds)
    except OverflowError:
        # So far before now that it precedes the year 1, or rounded up into the year 10000.
        raise SenmlError(f"record {index}: time {seconds!r} is out of range") from None


def _finite(index: int, what: str, number: float) -> float:
    # Each operand was finite, but their sum can still overflow.
    if not math.isfinite(number):
        raise SenmlError(f"record {index}: {what} is not a finite number")
    return number


def _show(text: str) -> str:
    """`text` quoted for an error message, cut short: labels come from the device."""
    return repr(text if len(text) <= 40 else text[:40] + "...")
