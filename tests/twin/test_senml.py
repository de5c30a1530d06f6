"""SenML (RFC 8428) decoding, resolution, latest values and the reported-state patch."""

from __future__ import annotations

import base64
import json
import math
import random
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import cbor2
import pytest

from twin.merge_patch import check_patch
from twin.senml import (
    MAX_NAME_LENGTH,
    MAX_RECORDS,
    RELATIVE_TIME_LIMIT,
    SENML_CBOR,
    SENML_JSON,
    Measurement,
    SenmlError,
    decode_pack,
    latest_values,
    reported_patch,
)

NOW = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# RFC 8428 table 6, written out again so the module's own table is checked against the RFC.
CBOR_LABELS = {
    "bver": -1,
    "bn": -2,
    "bt": -3,
    "bu": -4,
    "bv": -5,
    "bs": -6,
    "n": 0,
    "u": 1,
    "v": 2,
    "vs": 3,
    "vb": 4,
    "s": 5,
    "t": 6,
    "ut": 7,
    "vd": 8,
}


def to_cbor(pack: Any) -> bytes:
    """The CBOR form of a JSON-shaped pack: integer labels, vd as a byte string."""
    if not isinstance(pack, list):
        return bytes(cbor2.dumps(pack))
    records = []
    for record in pack:
        if not isinstance(record, dict):
            records.append(record)
            continue
        converted: dict[Any, Any] = {}
        for label, value in record.items():
            if label == "vd" and isinstance(value, str):
                value = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
            converted[CBOR_LABELS.get(label, label)] = value
        records.append(converted)
    return bytes(cbor2.dumps(records))


def decode(fmt: str, pack: Any, **options: Any) -> list[Measurement]:
    """`pack` (JSON-shaped) decoded from JSON or from its CBOR equivalent."""
    if fmt == "json":
        return decode_pack(json.dumps(pack).encode(), SENML_JSON, now=NOW, **options)
    return decode_pack(to_cbor(pack), SENML_CBOR, now=NOW, **options)


@pytest.fixture(params=["json", "cbor"])
def fmt(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def at(seconds: float) -> datetime:
    return EPOCH + timedelta(seconds=seconds)


def m(
    name: str,
    unit: str | None,
    value: float | str | bool | bytes | None,
    time: datetime = NOW,
    *,
    sum: float | None = None,
    update_time: float | None = None,
) -> Measurement:
    return Measurement(name, unit, value, sum, time, update_time)


# --- RFC 8428 section 5.1 examples, verbatim ---

SINGLE_DATAPOINT = """
[
  {"n":"urn:dev:ow:10e2073a01080063","u":"Cel","v":23.1}
]
"""

MULTIPLE_DATAPOINTS = """
[
  {"bn":"urn:dev:ow:10e2073a01080063:","n":"voltage","u":"V","v":120.1},
  {"n":"current","u":"A","v":1.2}
]
"""

MULTIPLE_DATAPOINTS_TIMED = """
[
  {"bn":"urn:dev:ow:10e2073a0108006:","bt":1.276020076001e+09,
   "bu":"A","bver":5,
   "n":"voltage","u":"V","v":120.1},
  {"n":"current","t":-5,"v":1.2},
  {"n":"current","t":-4,"v":1.3},
  {"n":"current","t":-3,"v":1.4},
  {"n":"current","t":-2,"v":1.5},
  {"n":"current","t":-1,"v":1.6},
  {"n":"current","v":1.7}
]
"""

# The same pack in CBOR as printed in RFC 8428 section 6 (note the half-precision 1.5).
MULTIPLE_DATAPOINTS_TIMED_CBOR = bytes.fromhex(
    "87a721781b75726e3a6465763a6f773a3130653230373361303130383030363a22fb41d303a15b00106223"
    "614120050067766f6c7461676501615602fb405e066666666666a3006763757272656e74062402fb3ff333"
    "3333333333a3006763757272656e74062302fb3ff4cccccccccccda3006763757272656e74062202fb3ff6"
    "666666666666a3006763757272656e74062102f93e00a3006763757272656e74062002fb3ff99999999999"
    "9aa3006763757272656e74060002fb3ffb333333333333"
)

MULTIPLE_MEASUREMENTS = """
[
  {"bn":"urn:dev:ow:10e2073a01080063","bt":1.320067464e+09,
   "bu":"%RH","v":20},
  {"u":"lon","v":24.30621},
  {"u":"lat","v":60.07965},
  {"t":60,"v":20.3},
  {"u":"lon","t":60,"v":24.30622},
  {"u":"lat","t":60,"v":60.07965},
  {"t":120,"v":20.7},
  {"u":"lon","t":120,"v":24.30623},
  {"u":"lat","t":120,"v":60.07966},
  {"u":"%EL","t":150,"v":98},
  {"t":180,"v":21.2},
  {"u":"lon","t":180,"v":24.30628},
  {"u":"lat","t":180,"v":60.07967}
]
"""

RESOLVED_DATA = """
[
  {"n":"urn:dev:ow:10e2073a01080063","u":"%RH","t":1.320067464e+09,"v":20},
  {"n":"urn:dev:ow:10e2073a01080063","u":"lon","t":1.320067464e+09,"v":24.30621},
  {"n":"urn:dev:ow:10e2073a01080063","u":"lat","t":1.320067464e+09,"v":60.07965},
  {"n":"urn:dev:ow:10e2073a01080063","u":"%RH","t":1.320067524e+09,"v":20.3},
  {"n":"urn:dev:ow:10e2073a01080063","u":"lon","t":1.320067524e+09,"v":24.30622},
  {"n":"urn:dev:ow:10e2073a01080063","u":"lat","t":1.320067524e+09,"v":60.07965},
  {"n":"urn:dev:ow:10e2073a01080063","u":"%RH","t":1.320067584e+09,"v":20.7},
  {"n":"urn:dev:ow:10e2073a01080063","u":"lon","t":1.320067584e+09,"v":24.30623},
  {"n":"urn:dev:ow:10e2073a01080063","u":"lat","t":1.320067584e+09,"v":60.07966},
  {"n":"urn:dev:ow:10e2073a01080063","u":"%EL","t":1.320067614e+09,"v":98},
  {"n":"urn:dev:ow:10e2073a01080063","u":"%RH","t":1.320067644e+09,"v":21.2},
  {"n":"urn:dev:ow:10e2073a01080063","u":"lon","t":1.320067644e+09,"v":24.30628},
  {"n":"urn:dev:ow:10e2073a01080063","u":"lat","t":1.320067644e+09,"v":60.07967}
]
"""

MULTIPLE_DATA_TYPES = """
[
  {"bn":"urn:dev:ow:10e2073a01080063:","n":"temp","u":"Cel","v":23.1},
  {"n":"label","vs":"Machine Room"},
  {"n":"open","vb":false},
  {"n":"nfc-reader","vd":"aGkgCg"}
]
"""

COLLECTION_OF_RESOURCES = """
[
  {"bn":"2001:db8::2/","bt":1.320078429e+09,
   "n":"temperature","u":"Cel","v":25.2},
  {"n":"humidity","u":"%RH","v":30},
  {"bn":"2001:db8::1/","n":"temperature","u":"Cel","v":12.3},
  {"n":"humidity","u":"%RH","v":67}
]
"""

SETTING_AN_ACTUATOR = """
[
  {"bn":"urn:dev:ow:10e2073a01080063:"},
  {"n":"temp","u":"Cel","v":23.1},
  {"n":"heat","u":"/","v":1},
  {"n":"fan","u":"/","v":0}
]
"""

OW = "urn:dev:ow:10e2073a01080063"
HUMIDITY_START = 1320067464
MULTIPLE_MEASUREMENTS_RESOLVED = [
    m(OW, "%RH", 20.0, at(HUMIDITY_START)),
    m(OW, "lon", 24.30621, at(HUMIDITY_START)),
    m(OW, "lat", 60.07965, at(HUMIDITY_START)),
    m(OW, "%RH", 20.3, at(HUMIDITY_START + 60)),
    m(OW, "lon", 24.30622, at(HUMIDITY_START + 60)),
    m(OW, "lat", 60.07965, at(HUMIDITY_START + 60)),
    m(OW, "%RH", 20.7, at(HUMIDITY_START + 120)),
    m(OW, "lon", 24.30623, at(HUMIDITY_START + 120)),
    m(OW, "lat", 60.07966, at(HUMIDITY_START + 120)),
    m(OW, "%EL", 98.0, at(HUMIDITY_START + 150)),
    m(OW, "%RH", 21.2, at(HUMIDITY_START + 180)),
    m(OW, "lon", 24.30628, at(HUMIDITY_START + 180)),
    m(OW, "lat", 60.07967, at(HUMIDITY_START + 180)),
]

# Tue Jun 8 18:01:16.001 UTC 2010, as the RFC puts it.
CURRENT_END = datetime(2010, 6, 8, 18, 1, 16, 1000, tzinfo=UTC)
OW6 = "urn:dev:ow:10e2073a0108006:"
MULTIPLE_DATAPOINTS_TIMED_RESOLVED = [
    m(OW6 + "voltage", "V", 120.1, CURRENT_END),
    *(
        m(OW6 + "current", "A", value, CURRENT_END - timedelta(seconds=ago))
        for ago, value in [(5, 1.2), (4, 1.3), (3, 1.4), (2, 1.5), (1, 1.6), (0, 1.7)]
    ),
]

COLLECTION_START = at(1320078429)  # Mon Oct 31 16:27:09 UTC 2011

RFC_EXAMPLES: dict[str, tuple[str, list[Measurement]]] = {
    "5.1.1 single datapoint": (SINGLE_DATAPOINT, [m(OW, "Cel", 23.1)]),
    "5.1.2 multiple datapoints": (
        MULTIPLE_DATAPOINTS,
        [m(OW + ":voltage", "V", 120.1), m(OW + ":current", "A", 1.2)],
    ),
    "5.1.2 multiple datapoints with time": (
        MULTIPLE_DATAPOINTS_TIMED,
        MULTIPLE_DATAPOINTS_TIMED_RESOLVED,
    ),
    "5.1.3 multiple measurements": (MULTIPLE_MEASUREMENTS, MULTIPLE_MEASUREMENTS_RESOLVED),
    "5.1.4 resolved data": (RESOLVED_DATA, MULTIPLE_MEASUREMENTS_RESOLVED),
    "5.1.5 multiple data types": (
        MULTIPLE_DATA_TYPES,
        [
            m(OW + ":temp", "Cel", 23.1),
            m(OW + ":label", None, "Machine Room"),
            m(OW + ":open", None, False),
            m(OW + ":nfc-reader", None, b"hi \n"),
        ],
    ),
    "5.1.6 collection of resources": (
        COLLECTION_OF_RESOURCES,
        [
            m("2001:db8::2/temperature", "Cel", 25.2, COLLECTION_START),
            m("2001:db8::2/humidity", "%RH", 30.0, COLLECTION_START),
            # The base name changed; the base time of record 0 still applies.
            m("2001:db8::1/temperature", "Cel", 12.3, COLLECTION_START),
            m("2001:db8::1/humidity", "%RH", 67.0, COLLECTION_START),
        ],
    ),
    "5.1.7 setting an actuator": (
        SETTING_AN_ACTUATOR,
        [
            m(OW + ":temp", "Cel", 23.1),
            m(OW + ":heat", "/", 1.0),
            m(OW + ":fan", "/", 0.0),
        ],
    ),
}


@pytest.mark.parametrize("example", RFC_EXAMPLES)
def test_rfc_8428_examples_in_json(example: str) -> None:
    text, expected = RFC_EXAMPLES[example]
    assert decode_pack(text.encode(), SENML_JSON, now=NOW) == expected


@pytest.mark.parametrize("example", RFC_EXAMPLES)
def test_rfc_8428_examples_in_cbor(example: str) -> None:
    text, expected = RFC_EXAMPLES[example]
    assert decode_pack(to_cbor(json.loads(text)), SENML_CBOR, now=NOW) == expected


def test_rfc_8428_section_6_cbor_bytes() -> None:
    decoded = decode_pack(MULTIPLE_DATAPOINTS_TIMED_CBOR, SENML_CBOR, now=NOW)
    assert decoded == MULTIPLE_DATAPOINTS_TIMED_RESOLVED


def test_resolved_data_is_what_the_multiple_measurements_resolve_to() -> None:
    # RFC 8428 section 5.1.4 is 5.1.3 resolved: both must decode alike.
    unresolved = decode_pack(MULTIPLE_MEASUREMENTS.encode(), SENML_JSON, now=NOW)
    assert unresolved == decode_pack(RESOLVED_DATA.encode(), SENML_JSON, now=NOW)


def test_values_have_their_types(fmt: str) -> None:
    pack = [
        {"n": "a", "v": 20},
        {"n": "b", "vs": ""},
        {"n": "c", "vb": True},
        {"n": "d", "vd": ""},
    ]
    values = [x.value for x in decode(fmt, pack)]
    assert values == [20.0, "", True, b""]
    assert type(values[0]) is float


# --- resolution ---


def test_time_zero_or_absent_is_now(fmt: str) -> None:
    assert [x.time for x in decode(fmt, [{"n": "a", "v": 1}, {"n": "a", "t": 0, "v": 2}])] == [
        NOW,
        NOW,
    ]


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"t": -60}, NOW - timedelta(seconds=60)),
        ({"t": 1.5}, NOW + timedelta(seconds=1.5)),
        ({"t": 0.000001}, NOW + timedelta(microseconds=1)),
        ({"t": RELATIVE_TIME_LIMIT - 1}, NOW + timedelta(seconds=RELATIVE_TIME_LIMIT - 1)),
        ({"t": RELATIVE_TIME_LIMIT}, at(RELATIVE_TIME_LIMIT)),
        ({"t": 1.7e9}, at(1_700_000_000)),
        # Base time and time are added first; the sum decides relative or absolute.
        ({"bt": 1.7e9, "t": -5}, at(1_699_999_995)),
        ({"bt": -10, "t": 4}, NOW - timedelta(seconds=6)),
        ({"bt": RELATIVE_TIME_LIMIT - 10, "t": 10}, at(RELATIVE_TIME_LIMIT)),
        ({"bt": RELATIVE_TIME_LIMIT + 10, "t": -11}, NOW + timedelta(seconds=2**28 - 1)),
        ({"t": 253402300799}, datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)),
        # Before 1970 is only reachable relative to now.
        ({"t": -1e9}, NOW - timedelta(seconds=1e9)),
    ],
)
def test_relative_and_absolute_times(
    fmt: str, fields: dict[str, float], expected: datetime
) -> None:
    [measurement] = decode(fmt, [{"n": "a", "v": 1, **fields}])
    assert measurement.time == expected
    assert measurement.time.utcoffset() == timedelta(0)


def test_now_in_another_zone_gives_utc_times() -> None:
    cest = timezone(timedelta(hours=2))
    now = datetime(2026, 5, 1, 14, 0, tzinfo=cest)
    [measurement] = decode_pack(b'[{"n":"a","v":1,"t":-1}]', SENML_JSON, now=now)
    assert measurement.time == NOW - timedelta(seconds=1)
    assert measurement.time.tzinfo is UTC


def test_naive_now_is_the_callers_mistake() -> None:
    with pytest.raises(ValueError, match="aware") as caught:
        decode_pack(b'[{"n":"a","v":1}]', SENML_JSON, now=datetime(2026, 5, 1))
    assert not isinstance(caught.value, SenmlError)


def test_base_value_is_added_to_numeric_values_only(fmt: str) -> None:
    pack = [
        {"bn": "meter:", "bv": 100, "n": "a", "v": 1.5},
        {"n": "b", "v": -2},
        {"n": "c", "vs": "x"},
        {"n": "d", "vb": False},
        {"bv": 0.5, "n": "e", "v": 0},
    ]
    assert [x.value for x in decode(fmt, pack)] == [101.5, 98.0, "x", False, 0.5]


def test_sum_only_records(fmt: str) -> None:
    pack = [
        {"bn": "meter:", "n": "energy", "u": "J", "s": 1000},
        {"n": "power", "u": "W", "v": 2, "s": 5},
        {"bs": 10, "n": "energy", "s": 5},
        # With a base sum in force, a record without s still has a sum (section 4.5.4).
        {"n": "energy"},
        {"n": "temp", "v": 21},
    ]
    assert [(x.value, x.sum) for x in decode(fmt, pack)] == [
        (None, 1000.0),
        (2.0, 5.0),
        (None, 15.0),
        (None, 10.0),
        (21.0, 10.0),
    ]


def test_unit_falls_back_to_base_unit(fmt: str) -> None:
    pack = [
        {"n": "a", "v": 1},
        {"bu": "Cel", "n": "b", "v": 1},
        {"n": "c", "u": "K", "v": 1},
        {"n": "d", "v": 1},
        {"bu": "", "n": "e", "v": 1},
    ]
    assert [x.unit for x in decode(fmt, pack)] == [None, "Cel", "K", "Cel", ""]


def test_base_name_concatenates_and_later_base_names_replace_it(fmt: str) -> None:
    pack = [
        {"bn": "lamp-7/", "n": "lux", "v": 1},
        {"bn": "lamp-8/", "v": 2},
        {"n": "lux", "v": 3},
        {"bn": "", "n": "plain", "v": 4},
    ]
    assert [x.name for x in decode(fmt, pack)] == ["lamp-7/lux", "lamp-8/", "lamp-8/lux", "plain"]


def test_update_time(fmt: str) -> None:
    [measurement] = decode(fmt, [{"n": "a", "v": 1, "ut": 30}])
    assert measurement.update_time == 30.0


def test_base_only_records_yield_nothing(fmt: str) -> None:
    pack = [{"bn": "x:", "bver": 10}, {"bt": 1.7e9, "bu": "V"}, {"n": "a", "v": 1}, {"bv": 2}]
    assert decode(fmt, pack) == [m("x:a", "V", 1.0, at(1.7e9))]


def test_versions_up_to_10_are_accepted(fmt: str) -> None:
    for version in (1, 5, 10):
        pack = [{"bver": version, "n": "a", "v": 1}, {"bver": version, "n": "b", "v": 2}]
        assert len(decode(fmt, pack)) == 2
    assert len(decode_pack(b'[{"bver":10.0,"n":"a","v":1}]', SENML_JSON, now=NOW)) == 1


def test_unknown_fields_are_ignored(fmt: str) -> None:
    pack = [{"n": "a", "v": 1, "foo": [1, {"x": None}], "bfoo": 3}]
    assert decode(fmt, pack) == [m("a", None, 1.0)]


def test_unknown_integer_labels_are_ignored_in_cbor() -> None:
    payload = cbor2.dumps([{0: "a", 2: 1, 99: "x", -99: None}])
    assert decode_pack(payload, SENML_CBOR, now=NOW) == [m("a", None, 1.0)]


def test_text_labels_have_no_meaning_in_cbor() -> None:
    # CBOR uses the integer labels; a text "v" is an unknown extension there.
    with pytest.raises(SenmlError, match=r"^record 0: no value$"):
        decode_pack(cbor2.dumps([{0: "a", "v": 1}]), SENML_CBOR, now=NOW)


def test_cbor_decimal_fractions_are_numbers() -> None:
    # 273.15 as decimal fraction [-2, 27315] (tag 4), which RFC 8428 section 6 allows.
    payload = cbor2.dumps([{0: "a", 2: cbor2.CBORTag(4, [-2, 27315])}])
    assert decode_pack(payload, SENML_CBOR, now=NOW) == [m("a", None, 273.15)]


def test_cbor_indefinite_length_array_and_half_floats() -> None:
    payload = bytes.fromhex(
        "9f" + "a2" + "0061" + "61" + "02" + "f93e00" + "ff"
    )  # [_ {0:"a",2:1.5}]
    assert decode_pack(payload, SENML_CBOR, now=NOW) == [m("a", None, 1.5)]


def test_base64url_data_values() -> None:
    raw = bytes(range(256))
    text = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    pack = [{"n": "a", "vd": text}, {"n": "b", "vd": text + "="}, {"n": "c", "vd": "-_8"}]
    assert [x.value for x in decode("json", pack)] == [raw, raw, b"\xfb\xff"]


def test_names_at_the_limits(fmt: str) -> None:
    longest = "a" * MAX_NAME_LENGTH
    allowed = "0Az:./_-9"
    assert [x.name for x in decode(fmt, [{"n": longest, "v": 1}, {"n": allowed, "v": 1}])] == [
        longest,
        allowed,
    ]
    assert len(decode(fmt, [{"n": "a", "v": 1}] * MAX_RECORDS)) == MAX_RECORDS


# --- errors ---

ERRORS: list[tuple[str, Any, str]] = [
    ("not an array", {"n": "a", "v": 1}, "not SenML: expected an array of records"),
    ("a string", "hello", "not SenML: expected an array of records"),
    ("empty pack", [], "not SenML: the pack has no records"),
    ("record not a map", [{"n": "a", "v": 1}, 5], "record 1: expected a"),
    ("no value", [{"n": "a"}], "record 0: no value"),
    ("unit only", [{"n": "a", "u": "Cel"}], "record 0: no value"),
    ("time only", [{"n": "a", "t": 5}], "record 0: no value"),
    ("base value is no value", [{"bv": 5, "n": "a"}], "record 0: no value"),
    ("two values", [{"n": "a", "v": 1, "vs": "x"}], r"record 0: more than one value \(v, vs\)"),
    (
        "three values",
        [{"n": "a", "vb": True, "v": 1, "vs": "x"}],
        r"record 0: more than one value \(v, vs, vb\)",
    ),
    ("no name", [{"n": "a", "v": 1}, {"v": 1}], r"record 1: no name \(neither bn nor n\)"),
    ("empty name", [{"n": "", "v": 1}], "record 0: no name"),
    ("space", [{"n": "x y", "v": 1}], "record 0: name 'x y' has characters SenML does not allow"),
    ("non-ASCII", [{"n": "températur", "v": 1}], "record 0: name 'températur' has characters"),
    ("newline", [{"n": "a\n", "v": 1}], r"record 0: name 'a\\n' has characters"),
    ("percent", [{"n": "a%20b", "v": 1}], "record 0: name 'a%20b' has characters"),
    (
        "first character",
        [{"n": "-x", "v": 1}],
        "record 0: name '-x' does not start with a letter or digit",
    ),
    (
        "resolved name",
        [{"bn": "a b/"}, {"n": "x", "v": 1}],
        "record 1: name 'a b/x' has characters",
    ),
    (
        "resolved first character",
        [{"bn": "_dev:"}, {"n": "x", "v": 1}],
        "record 1: name '_dev:x' does not start",
    ),
    (
        "name too long",
        [{"bn": "a" * 100, "n": "b" * 29, "v": 1}],
        "record 0: name is 129 characters long; the limit is 128",
    ),
    ("n not a string", [{"n": 5, "v": 1}], "record 0: n must be a string"),
    ("bn not a string", [{"bn": None, "n": "a", "v": 1}], "record 0: bn must be a string"),
    ("u not a string", [{"n": "a", "u": 1, "v": 1}], "record 0: u must be a string"),
    ("bu not a string", [{"bu": ["V"], "n": "a", "v": 1}], "record 0: bu must be a string"),
    ("vs not a string", [{"n": "a", "vs": 5}], "record 0: vs must be a string"),
    ("v a string", [{"n": "a", "v": "1"}], "record 0: v must be a number"),
    ("v a boolean", [{"n": "a", "v": True}], "record 0: v must be a number"),
    ("v null", [{"n": "a", "v": None}], "record 0: v must be a number"),
    ("vb a number", [{"n": "a", "vb": 1}], "record 0: vb must be a boolean"),
    ("vd a number", [{"n": "a", "vd": 1}], "record 0: vd must be a"),
    ("s a string", [{"n": "a", "s": "1"}], "record 0: s must be a number"),
    ("t a string", [{"n": "a", "v": 1, "t": "now"}], "record 0: t must be a number"),
    ("ut a boolean", [{"n": "a", "v": 1, "ut": False}], "record 0: ut must be a number"),
    ("bt a string", [{"bt": "0", "n": "a", "v": 1}], "record 0: bt must be a number"),
    ("bv a string", [{"bv": "0", "n": "a", "v": 1}], "record 0: bv must be a number"),
    ("bs a string", [{"bs": "0", "n": "a", "v": 1}], "record 0: bs must be a number"),
    ("negative ut", [{"n": "a", "v": 1, "ut": -1}], "record 0: ut must not be negative"),
    ("v NaN", [{"n": "a", "v": math.nan}], "record 0: v is not a finite number"),
    ("v infinite", [{"n": "a", "v": math.inf}], "record 0: v is not a finite number"),
    ("s NaN", [{"n": "a", "s": math.nan}], "record 0: s is not a finite number"),
    ("bt -infinite", [{"bt": -math.inf, "n": "a", "v": 1}], "record 0: bt is not a finite"),
    ("bv NaN", [{"bv": math.nan, "n": "a", "v": 1}], "record 0: bv is not a finite number"),
    ("bs infinite", [{"bs": math.inf}], "record 0: bs is not a finite number"),
    ("t NaN", [{"n": "a", "v": 1, "t": math.nan}], "record 0: t is not a finite number"),
    ("ut infinite", [{"n": "a", "v": 1, "ut": math.inf}], "record 0: ut is not a finite"),
    ("bv + v overflows", [{"bv": 1e308, "n": "a", "v": 1e308}], r"record 0: bv \+ v is not"),
    ("bs + s overflows", [{"bs": -1e308, "n": "a", "s": -1e308}], r"record 0: bs \+ s is not"),
    ("bt + t overflows", [{"bt": 1e308, "n": "a", "v": 1, "t": 1e308}], r"record 0: bt \+ t is"),
    ("beyond 9999", [{"n": "a", "v": 1, "t": 253402300800}], "record 0: time .* beyond the year"),
    ("far beyond 9999", [{"n": "a", "v": 1, "t": 1e300}], r"record 0: time 1e\+300 is beyond"),
    ("before year 1", [{"n": "a", "v": 1, "t": -1e12}], r"record 0: time -1000000000000\.0 is out"),
    ("relative overflow", [{"n": "a", "v": 1, "t": -1e300}], "record 0: time .* is out of range"),
    ("bver 11", [{"bver": 11, "n": "a", "v": 1}], "record 0: SenML version 11 is newer than"),
    ("bver 0", [{"bver": 0, "n": "a", "v": 1}], "record 0: bver must be a positive integer"),
    ("bver -1", [{"bver": -1, "n": "a", "v": 1}], "record 0: bver must be a positive integer"),
    ("bver 1.5", [{"bver": 1.5, "n": "a", "v": 1}], "record 0: bver must be a positive integer"),
    ("bver string", [{"bver": "10", "n": "a", "v": 1}], "record 0: bver must be a positive"),
    ("bver boolean", [{"bver": True, "n": "a", "v": 1}], "record 0: bver must be a positive"),
    (
        "bver changes",
        [{"bver": 5, "n": "a", "v": 1}, {"bver": 6, "n": "a", "v": 1}],
        "record 1: bver 6 differs from the pack's version 5",
    ),
    (
        "bver after default",
        [{"n": "a", "v": 1}, {"bver": 5, "n": "a", "v": 1}],
        "record 1: bver 5 differs from the pack's version 10",
    ),
    (
        "must-understand label",
        [{"n": "a", "v": 1}, {"n": "a", "v": 1, "custom_": 1}],
        "record 1: label 'custom_' must be understood and is not supported",
    ),
    (
        "long must-understand label",
        [{"n": "a", "v": 1, "x" * 100 + "_": 1}],
        f"record 0: label '{'x' * 40}\\.\\.\\.' must be understood",
    ),
    (
        "errors are found in pack order",
        [{"n": "a", "v": 1}, {"n": "a", "v": 1}, {"n": "a", "v": 1}, {"n": "a"}, {"n": " "}],
        "record 3: no value",
    ),
]


@pytest.mark.parametrize(("pack", "message"), [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_errors(fmt: str, pack: Any, message: str) -> None:
    with pytest.raises(SenmlError, match=f"^{message}"):
        decode(fmt, pack)


def test_record_not_a_map_names_the_format() -> None:
    with pytest.raises(SenmlError, match=r"^record 0: expected a JSON object$"):
        decode_pack(b"[[1]]", SENML_JSON, now=NOW)
    with pytest.raises(SenmlError, match=r"^record 0: expected a CBOR map$"):
        decode_pack(cbor2.dumps([[1]]), SENML_CBOR, now=NOW)


def test_too_many_records(fmt: str) -> None:
    with pytest.raises(SenmlError, match=r"^the pack has 501 records; the limit is 500$"):
        decode(fmt, [{"n": "a", "v": 1}] * 501)
    with pytest.raises(SenmlError, match=r"^the pack has 3 records; the limit is 2$"):
        decode(fmt, [{"n": "a", "v": 1}] * 3, max_records=2)
    assert len(decode(fmt, [{"n": "a", "v": 1}] * 2, max_records=2)) == 2


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"", r"not SenML: invalid JSON \(Expecting value"),
        (b'[{"n":"a","v":1}', "not SenML: invalid JSON"),
        (b'[{"n":"a","v":1}] x', r"not SenML: invalid JSON \(Extra data"),
        (b'[{"n":"a","v":NaN}]', "record 0: v is not a finite number"),
        (b'[{"n":"a","v":Infinity}]', "record 0: v is not a finite number"),
        (b'[{"n":"a","v":-Infinity}]', "record 0: v is not a finite number"),
        (b'[{"n":"a","v":1e999}]', "record 0: v is not a finite number"),
        (b'[{"n":"a","v":' + b"9" * 400 + b"}]", "record 0: v is not a finite number"),
        (b'[{"n":"a","v":' + b"1" * 5000 + b"}]", "not SenML: invalid JSON"),
        (b'[{"n":"a","v":1,"v":2}]', "record 0: label 'v' appears more than once"),
        (b'[{"n":"a","v":1},{"n":"b","vs":"x","n":"c"}]', "record 1: label 'n' appears more"),
        (b'[{"n":"\xe9","v":1}]', "not SenML: the JSON is not UTF-8"),
        ('[{"n":"a","v":1}]'.encode("utf-16"), "not SenML: the JSON is not UTF-8"),
        (b"\xef\xbb\xbf[]", "not SenML: invalid JSON"),
        (b"[" * 100_000, "not SenML: the JSON nests too deeply"),
        (b'[{"n":"a","vd":"aGk+Cg"}]', "record 0: vd is not valid base64url"),
        (b'[{"n":"a","vd":"aGk/Cg"}]', "record 0: vd is not valid base64url"),
        (b'[{"n":"a","vd":"aGkgC"}]', "record 0: vd is not valid base64url"),
        (b'[{"n":"a","vd":"aG kgCg"}]', "record 0: vd is not valid base64url"),
        (b'[{"n":"a","vd":"aGkgCg==="}]', "record 0: vd is not valid base64url"),
        (b'[{"n":"a","vd":"=aGk"}]', "record 0: vd is not valid base64url"),
    ],
)
def test_json_errors(payload: bytes, message: str) -> None:
    with pytest.raises(SenmlError, match=f"^{message}"):
        decode_pack(payload, SENML_JSON, now=NOW)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"", r"not SenML: invalid CBOR \(.*premature end"),
        (bytes.fromhex("82a20061610201"), r"not SenML: invalid CBOR"),  # array(2), one item
        (cbor2.dumps([{0: "a", 2: 1}]) + b"\x00", "not SenML: bytes follow the CBOR array"),
        # A lone break: cbor2 6 rejects it, cbor2 5 returns a marker that is no array.
        (bytes.fromhex("ff"), "not SenML: invalid CBOR|not SenML: expected an array"),
        (bytes.fromhex("81a2006261ff0201"), "not SenML: invalid CBOR"),  # bad UTF-8 in n
        (b"\x81" * 100_000 + b"\x80", "not SenML: the CBOR nests too deeply|not SenML: invalid"),
        (cbor2.dumps([{0: "a", 8: "aGkgCg"}]), "record 0: vd must be a byte string"),
        (cbor2.dumps([{0: "a", 2: 1, 1.5: 1}]), "record 0: a label is a float"),
        (cbor2.dumps([{0: "a", 2: 1, b"v": 1}]), "record 0: a label is a bytes"),
        (cbor2.dumps([{0: "a", 2: 1, True: "u"}]), "record 0: a label is a bool"),
        (cbor2.dumps([{0: "a", 2: 1, "x_": 1}]), "record 0: label 'x_' must be understood"),
        (cbor2.dumps([{0: "a", 2: cbor2.undefined}]), "record 0: v must be a number"),
        (cbor2.dumps([{0: "a", 2: cbor2.CBORSimpleValue(99)}]), "record 0: v must be a number"),
        (cbor2.dumps([{0: "a", 2: math.nan}]), "record 0: v is not a finite number"),
        (cbor2.dumps([{0: "a", 2: -math.inf}]), "record 0: v is not a finite number"),
        # A bignum as v (tag 2), a datetime (tag 1), a shared reference (tag 28), a rational
        # (tag 30): no tag but decimal fractions means anything in SenML.
        (cbor2.dumps([{0: "a", 2: 2**70}]), "not SenML: CBOR tag 2 has no meaning in SenML"),
        (
            cbor2.dumps([{0: "a", 2: cbor2.CBORTag(1, 0)}]),
            "not SenML: CBOR tag 1 has no meaning in SenML",
        ),
        (bytes.fromhex("d81c81d81d00"), "not SenML: CBOR tag 28 has no meaning in SenML"),
        (
            cbor2.dumps([{0: "a", 2: cbor2.CBORTag(4, [0, cbor2.CBORTag(2, b"\xff" * 9000)])}]),
            "not SenML: CBOR tag 2",
        ),
        (cbor2.dumps(cbor2.CBORTag(55799, [])), "not SenML: CBOR tag 55799"),
        (
            cbor2.dumps([{0: "a", 2: cbor2.CBORTag(4, [100000, 1])}]),
            "record 0: v is not a finite number",
        ),
        (cbor2.dumps([{0: "a", 2: cbor2.CBORTag(4, [1, 2, 3])}]), "not SenML: invalid CBOR"),
    ],
)
def test_cbor_errors(payload: bytes, message: str) -> None:
    with pytest.raises(SenmlError, match=f"^({message})"):
        decode_pack(payload, SENML_CBOR, now=NOW)


def test_cbor_string_contents_are_not_taken_for_tags() -> None:
    # Bytes 0xc0-0xdf are tag heads outside strings: tags 1 and 24, then 21 in UTF-8 (d5 81).
    payload = cbor2.dumps([{0: "a", 8: b"\xc1\xd8\x18"}, {0: "b", 3: "\u0581"}])
    assert [x.value for x in decode_pack(payload, SENML_CBOR, now=NOW)] == [
        b"\xc1\xd8\x18",
        "\u0581",
    ]


@pytest.mark.parametrize("content_format", [0, 50, 60, 111, 113, 320])
def test_unknown_content_format(content_format: int) -> None:
    with pytest.raises(SenmlError, match=f"^content-format {content_format} is neither"):
        decode_pack(b'[{"n":"a","v":1}]', content_format, now=NOW)


@pytest.mark.parametrize("content_format", [SENML_JSON, SENML_CBOR])
def test_garbage_only_ever_raises_senml_errors(content_format: int) -> None:
    rng = random.Random(8428)
    valid = [
        MULTIPLE_DATA_TYPES.encode(),
        to_cbor(json.loads(MULTIPLE_DATA_TYPES)),
        MULTIPLE_DATAPOINTS_TIMED_CBOR,
    ]
    for _ in range(3000):
        if rng.random() < 0.3:
            payload = bytes(rng.randrange(256) for _ in range(rng.randrange(40)))
        else:
            mutated = bytearray(rng.choice(valid))
            for _ in range(rng.randrange(1, 4)):
                mutated[rng.randrange(len(mutated))] = rng.randrange(256)
            payload = bytes(mutated[: rng.randrange(1, len(mutated) + 1)])
        try:
            measurements = decode_pack(payload, content_format, now=NOW)
        except SenmlError:
            continue
        assert all(isinstance(x, Measurement) for x in measurements)


# --- latest values and the reported patch ---


def test_latest_values_pick_the_newest_per_name() -> None:
    measurements = [
        m("a", None, 1.0, NOW),
        m("b", None, 1.0, NOW),
        m("a", None, 2.0, NOW + timedelta(seconds=5)),
        # Older than what came before it in the pack: position does not make it newer.
        m("a", None, 3.0, NOW - timedelta(seconds=5)),
        m("c", None, "x", NOW),
    ]
    latest = latest_values(measurements)
    assert latest == {
        "a": measurements[2],
        "b": measurements[1],
        "c": measurements[4],
    }
    assert list(latest) == ["a", "b", "c"]


def test_latest_values_ties_go_to_the_later_record() -> None:
    first, second = m("a", None, 1.0), m("a", None, 2.0)
    assert latest_values([first, second]) == {"a": second}
    assert latest_values([second, first]) == {"a": first}
    assert latest_values([]) == {}


def test_latest_values_of_an_rfc_pack() -> None:
    timed = decode_pack(MULTIPLE_DATAPOINTS_TIMED.encode(), SENML_JSON, now=NOW)
    assert latest_values(timed) == {
        OW6 + "voltage": m(OW6 + "voltage", "V", 120.1, CURRENT_END),
        OW6 + "current": m(OW6 + "current", "A", 1.7, CURRENT_END),
    }
    # Section 5.1.3 tells humidity, longitude and latitude apart by unit only: one name, so
    # one latest value, the last of the three records at t=180.
    measured = decode_pack(MULTIPLE_MEASUREMENTS.encode(), SENML_JSON, now=NOW)
    assert latest_values(measured) == {OW: MULTIPLE_MEASUREMENTS_RESOLVED[-1]}


def test_reported_patch_sets_the_measured_properties() -> None:
    latest = latest_values(
        [
            m("noise_db", "dB", 61.5),
            m("energy.total_wh", "Wh", 1200.0),
            m("energy.power_w", "W", None, sum=35.0),
            m("parking_occupied", None, True),
            m("label", None, "Machine Room"),
        ]
    )
    patch = reported_patch(latest)
    assert patch == {
        "noise_db": 61.5,
        "energy": {"total_wh": 1200.0, "power_w": 35.0},
        "parking_occupied": True,
        "label": "Machine Room",
    }
    assert check_patch(patch) == patch
    assert reported_patch({}) == {}


@pytest.mark.parametrize(
    ("names", "words"),
    [
        (["a..b"], "does not name a property"),
        (["a[0]"], "does not name a property"),
        (["energy", "energy.total_wh"], "nests under"),
        (["energy.total_wh", "energy"], "prefix of another"),
    ],
)
def test_reported_patch_refuses_names_that_are_not_properties(names: list[str], words: str) -> None:
    latest = latest_values([m(name, None, 1.0) for name in names])
    with pytest.raises(SenmlError, match=words):
        reported_patch(latest)


def test_reported_patch_refuses_data_values() -> None:
    with pytest.raises(SenmlError, match="data values"):
        reported_patch({"thumb": m("thumb", None, b"\x00")})
