"""Device profiles: consistency, patch validation, storage form and the built-ins."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any, Literal

import pytest

from twin.builtin_profiles import BUILTIN_PROFILES, builtin_profile
from twin.errors import InvalidArgument, ProfileViolation
from twin.merge_patch import JSON, Document
from twin.profiles import (
    Profile,
    PropertySpec,
    PropertyType,
    check_profile,
    profile_from_dict,
    profile_to_dict,
    validate_patch,
)

T = PropertyType
LAMP = builtin_profile("lamp-led-dimmable")
SENSOR = builtin_profile("env-sensor")
CAMERA = builtin_profile("camera-ip")
assert LAMP is not None and SENSOR is not None and CAMERA is not None


def custom(*properties: PropertySpec, model: str = "custom-1", kind: str = "sensor") -> Profile:
    return Profile(model=model, kind=kind, properties=properties)


# --- built-ins -------------------------------------------------------------------------------


@pytest.mark.parametrize("profile", BUILTIN_PROFILES, ids=lambda p: p.model)
def test_builtins_are_consistent(profile: Profile) -> None:
    check_profile(profile)
    assert profile.builtin
    assert builtin_profile(profile.model) is profile
    assert profile.description
    for p in profile.properties:
        assert p.description, p.path
    # Every built-in model takes firmware jobs (written by campaigns) and reports progress.
    for path in ("firmware", "firmware.version", "firmware.sha256", "firmware.action"):
        spec = profile.spec(path)
        assert spec is not None and spec.writable, path
    for path in ("firmware.state", "firmware.result", "firmware.reason", "firmware.job"):
        spec = profile.spec(path)
        assert spec is not None and not spec.writable, path


def test_builtin_models_and_kinds() -> None:
    assert {(p.model, p.kind) for p in BUILTIN_PROFILES} == {
        ("lamp-led-dimmable", "lamp"),
        ("env-sensor", "sensor"),
        ("camera-ip", "camera"),
    }
    assert builtin_profile("no-such-model") is None
    assert builtin_profile("") is None


def test_heartbeat_intervals() -> None:
    assert {p.model: p.heartbeat_interval_seconds for p in BUILTIN_PROFILES} == {
        "lamp-led-dimmable": 300,
        "env-sensor": 900,
        "camera-ip": 60,
    }
    assert LAMP is not None
    for bad in (9, 86_401):
        with pytest.raises(InvalidArgument, match="heartbeat_interval_seconds"):
            check_profile(replace(LAMP, builtin=False, heartbeat_interval_seconds=bad))
    data = profile_to_dict(LAMP)
    del data["heartbeat_interval_seconds"]  # stored before the field existed
    assert profile_from_dict(data).heartbeat_interval_seconds == 300


def test_builtin_units() -> None:
    assert LAMP is not None and SENSOR is not None
    units = {p.path: p.unit for p in (*LAMP.properties, *SENSOR.properties)}
    assert units["brightness"] == "%"
    assert units["energy.total_wh"] == "Wh"
    assert units["energy.power_w"] == "W"
    assert units["pm2_5"] == units["pm10"] == units["no2"] == "µg/m³"
    assert units["noise_db"] == "dB"
    assert units["report_interval"] == "s"


@pytest.mark.parametrize("profile", BUILTIN_PROFILES, ids=lambda p: p.model)
def test_builtins_round_trip_through_storage(profile: Profile) -> None:
    stored = json.loads(json.dumps(profile_to_dict(profile)))
    assert profile_from_dict(stored) == profile


def test_spec_lookup() -> None:
    assert LAMP is not None
    level = LAMP.spec("dimming_schedule[].level")
    assert level is not None and level.type is T.INTEGER and level.maximum == 100
    assert LAMP.spec("dimming_schedule.level") is None
    assert LAMP.spec("nope") is None


# --- check_profile ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("profile", "fragment"),
    [
        (custom(PropertySpec("a", T.BOOLEAN), model="Bad"), "model 'Bad'"),
        (custom(PropertySpec("a", T.BOOLEAN), model=""), "model ''"),
        (custom(PropertySpec("a", T.BOOLEAN), model="-a"), "model '-a'"),
        (custom(PropertySpec("a", T.BOOLEAN), model="a-"), "model 'a-'"),
        (custom(PropertySpec("a", T.BOOLEAN), model="a" * 64), "model"),
        (custom(PropertySpec("a", T.BOOLEAN), kind="bus"), "unknown kind 'bus'"),
        (custom(PropertySpec("a", T.BOOLEAN), kind="Lamp"), "unknown kind 'Lamp'"),
        (custom(), "declares no properties"),
        (custom(*(PropertySpec(f"p{i}", T.BOOLEAN) for i in range(513))), "the limit is 512"),
        (custom(PropertySpec("a", T.BOOLEAN), PropertySpec("a", T.STRING)), "declared twice"),
        (custom(PropertySpec("", T.BOOLEAN)), "malformed path"),
        (custom(PropertySpec("a..b", T.BOOLEAN)), "malformed path"),
        (custom(PropertySpec(".a", T.BOOLEAN)), "malformed path"),
        (custom(PropertySpec("a b", T.BOOLEAN)), "malformed path"),
        (custom(PropertySpec("a[", T.BOOLEAN)), "malformed path"),
        (custom(PropertySpec("a[0]", T.BOOLEAN)), "malformed path"),
        (custom(PropertySpec("[]", T.BOOLEAN)), "malformed path"),
        (custom(PropertySpec("a" * 129, T.BOOLEAN)), "malformed path"),
        (custom(PropertySpec("a.b", T.BOOLEAN)), "parent 'a' is not declared"),
        (
            custom(PropertySpec("a", T.ARRAY), PropertySpec("a.b", T.BOOLEAN)),
            "parent 'a' is array, not object",
        ),
        (custom(PropertySpec("a[]", T.BOOLEAN)), "parent 'a' is not declared"),
        (
            custom(PropertySpec("a", T.OBJECT), PropertySpec("a[]", T.BOOLEAN)),
            "parent 'a' is object, not array",
        ),
        (
            custom(
                PropertySpec("a", T.ARRAY),
                PropertySpec("a[]", T.STRING),
                PropertySpec("a[].b", T.BOOLEAN),
            ),
            "parent 'a[]' is string, not object",
        ),
        (
            custom(PropertySpec("a", T.ARRAY), PropertySpec("a[].b", T.BOOLEAN)),
            "parent 'a[]' is not declared",
        ),
        (custom(PropertySpec("a", T.STRING, minimum=0)), "minimum is only for"),
        (custom(PropertySpec("a", T.BOOLEAN, maximum=1)), "maximum is only for"),
        (
            custom(PropertySpec("a", T.INTEGER, minimum=5, maximum=1)),
            "minimum 5 is above maximum 1",
        ),
        (custom(PropertySpec("a", T.NUMBER, minimum=float("nan"))), "finite"),
        (custom(PropertySpec("a", T.NUMBER, maximum=float("inf"))), "finite"),
        (custom(PropertySpec("a", T.INTEGER, allowed_values=("1",))), "only for string"),
        (custom(PropertySpec("a", T.STRING, allowed_values=("x", "x"))), "duplicates"),
        (
            custom(PropertySpec("a", T.STRING, allowed_values=("xyz",), max_length=2)),
            "allowed value 'xyz'",
        ),
        (custom(PropertySpec("a", T.STRING, max_length=0)), "max_length"),
        (custom(PropertySpec("a", T.ARRAY, max_items=0)), "max_items"),
        (custom(PropertySpec("a", "text")), "unknown type"),  # type: ignore[arg-type]
    ],
)
def test_check_profile_refuses(profile: Profile, fragment: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        check_profile(profile)
    assert fragment in str(info.value)


def test_check_profile_accepts_nested_and_array_paths() -> None:
    check_profile(
        custom(
            PropertySpec("a", T.OBJECT),
            PropertySpec("a.b", T.ARRAY),
            PropertySpec("a.b[]", T.ARRAY),
            PropertySpec("a.b[][]", T.OBJECT),
            PropertySpec("a.b[][].c-d_e", T.NUMBER, minimum=-1.5, maximum=-1.5),
            PropertySpec("pm2_5", T.STRING, allowed_values=("x",)),
            PropertySpec("3311", T.BOOLEAN),
            model="a.b_c-9",
            kind="camera",
        )
    )
    check_profile(custom(*(PropertySpec(f"p{i}", T.BOOLEAN) for i in range(512))))
    check_profile(custom(PropertySpec("a", T.BOOLEAN), model="a"))
    check_profile(custom(PropertySpec("a", T.BOOLEAN), model="a" * 63))


# --- validate_patch --------------------------------------------------------------------------

Doc = Literal["desired", "reported"]


@pytest.mark.parametrize(
    ("patch", "document"),
    [
        ({}, "desired"),
        ({"power": True, "brightness": 0}, "desired"),
        ({"brightness": 100}, "desired"),
        ({"brightness": None, "power": None, "dimming_schedule": None}, "desired"),
        ({"dimming_schedule": []}, "desired"),
        ({"dimming_schedule": [{"at": "22:00", "level": 40}, {"at": "sunrise"}]}, "desired"),
        ({"dimming_schedule": [{}] * 24}, "desired"),
        ({"energy": {"total_wh": 0, "power_w": 12.5}}, "reported"),
        ({"energy": {"total_wh": 10**12}}, "reported"),
        ({"energy": None, "faults": {"lamp_failure": None}}, "reported"),
        ({"faults": {"driver_failure": True, "lamp_failure": False}}, "reported"),
        ({"fault_codes": ["E1", "x" * 64]}, "reported"),
        ({"firmware": {"version": "2.1.0"}}, "reported"),
        ({"power": False, "brightness": 55}, "reported"),
        ({"energy": {}}, "reported"),
    ],
)
def test_lamp_patches_accepted(patch: Document, document: Doc) -> None:
    assert LAMP is not None
    validate_patch(LAMP, patch, document=document)


@pytest.mark.parametrize(
    ("patch", "document", "path", "reason"),
    [
        ({"brightness": 120}, "desired", "desired.brightness", "120 is above the maximum 100"),
        ({"brightness": -1}, "reported", "reported.brightness", "-1 is below the minimum 0"),
        ({"brightness": 50.5}, "desired", "desired.brightness", "expected integer, got number"),
        ({"brightness": True}, "desired", "desired.brightness", "expected integer, got boolean"),
        ({"brightness": "50"}, "desired", "desired.brightness", "expected integer, got string"),
        ({"power": 1}, "desired", "desired.power", "expected boolean, got integer"),
        ({"power": "on"}, "desired", "desired.power", "expected boolean, got string"),
        ({"power": [True]}, "desired", "desired.power", "expected boolean, got array"),
        ({"power": {}}, "desired", "desired.power", "expected boolean, got object"),
        ({"energy": {"total_wh": 5}}, "desired", "desired.energy.total_wh", "is read-only"),
        ({"energy": None}, "desired", "desired.energy", "is read-only"),
        ({"energy": {}}, "desired", "desired.energy", "is read-only"),
        ({"energy": 5}, "desired", "desired.energy", "is read-only"),
        ({"energy": 5}, "reported", "reported.energy", "expected object, got integer"),
        ({"energy": {"total_wh": -1}}, "reported", "reported.energy.total_wh", "-1 is below"),
        ({"energy": {"total_wh": False}}, "reported", "reported.energy.total_wh", "got boolean"),
        (
            {"energy": {"volts": 230}},
            "reported",
            "reported.energy.volts",
            "unknown property for model lamp-led-dimmable",
        ),
        (
            {"colour": "red"},
            "reported",
            "reported.colour",
            "unknown property for model lamp-led-dimmable",
        ),
        ({"colour": None}, "desired", "desired.colour", "unknown property"),
        ({"firmware": {"state": "idle"}}, "desired", "desired.firmware.state", "is read-only"),
        ({"firmware": {"action": "flash"}}, "desired", "desired.firmware.action", "not one of"),
        ({"fault_codes": ["E1"]}, "desired", "desired.fault_codes", "is read-only"),
        ({"faults": {"lamp_failure": None}}, "desired", "desired.faults.lamp_failure", "read-only"),
        (
            {"dimming_schedule": [{"at": "x", "level": 1}, {"at": "y"}, {"level": "high"}]},
            "desired",
            "desired.dimming_schedule[2].level",
            "expected integer, got string",
        ),
        (
            {"dimming_schedule": [{"level": 101}]},
            "desired",
            "desired.dimming_schedule[0].level",
            "101 is above the maximum 100",
        ),
        (
            {"dimming_schedule": [{"at": "x" * 33}]},
            "desired",
            "desired.dimming_schedule[0].at",
            "is 33 characters long; the maximum is 32",
        ),
        (
            {"dimming_schedule": [{"when": "x"}]},
            "desired",
            "desired.dimming_schedule[0].when",
            "unknown property",
        ),
        (
            {"dimming_schedule": ["22:00"]},
            "desired",
            "desired.dimming_schedule[0]",
            "expected object, got string",
        ),
        (
            {"dimming_schedule": [None]},
            "desired",
            "desired.dimming_schedule[0]",
            "expected object, got null",
        ),
        (
            {"dimming_schedule": [{}] * 25},
            "desired",
            "desired.dimming_schedule",
            "has 25 items; the maximum is 24",
        ),
        (
            {"dimming_schedule": {"at": "x"}},
            "desired",
            "desired.dimming_schedule",
            "expected array, got object",
        ),
        (
            {"fault_codes": ["x" * 65]},
            "reported",
            "reported.fault_codes[0]",
            "is 65 characters long; the maximum is 64",
        ),
    ],
)
def test_lamp_patches_refused(patch: Document, document: Doc, path: str, reason: str) -> None:
    assert LAMP is not None
    with pytest.raises(ProfileViolation) as info:
        validate_patch(LAMP, patch, document=document)
    assert info.value.path == path
    assert reason in info.value.reason
    assert str(info.value) == f"{path}: {info.value.reason}"


def test_reason_text_exactly() -> None:
    assert LAMP is not None
    with pytest.raises(ProfileViolation) as info:
        validate_patch(LAMP, {"brightness": 120}, document="desired")
    assert (info.value.path, info.value.reason) == (
        "desired.brightness",
        "120 is above the maximum 100",
    )


def test_sensor_and_camera_rules() -> None:
    assert SENSOR is not None and CAMERA is not None
    validate_patch(SENSOR, {"report_interval": 10}, document="desired")
    validate_patch(SENSOR, {"report_interval": 86400}, document="desired")
    validate_patch(SENSOR, {"pm2_5": 12, "noise_db": 54.5, "battery": 100.0}, document="reported")
    for bad, reason in [(9, "below the minimum 10"), (86401, "above the maximum 86400")]:
        with pytest.raises(ProfileViolation, match=reason):
            validate_patch(SENSOR, {"report_interval": bad}, document="desired")
    with pytest.raises(ProfileViolation, match=r"desired\.pm2_5: is read-only"):
        validate_patch(SENSOR, {"pm2_5": 1}, document="desired")
    with pytest.raises(ProfileViolation, match="above the maximum 2000"):
        validate_patch(SENSOR, {"no2": 2000.5}, document="reported")
    validate_patch(CAMERA, {"stream_profile": "high", "resolution": "2160p"}, document="desired")
    validate_patch(CAMERA, {"storage_health": "degraded"}, document="reported")
    with pytest.raises(ProfileViolation) as info:
        validate_patch(CAMERA, {"resolution": "4k"}, document="desired")
    assert info.value.reason == "'4k' is not one of 720p, 1080p, 1440p, 2160p"
    with pytest.raises(ProfileViolation, match=r"desired\.storage_health: is read-only"):
        validate_patch(CAMERA, {"storage_health": "ok"}, document="desired")


def test_number_accepts_int_and_float() -> None:
    profile = custom(PropertySpec("x", T.NUMBER, writable=True, minimum=0.5, maximum=2.5))
    validate_patch(profile, {"x": 1}, document="desired")
    validate_patch(profile, {"x": 2.5}, document="desired")
    validate_patch(profile, {"x": 0.5}, document="desired")
    with pytest.raises(ProfileViolation, match=r"0\.25 is below the minimum 0\.5"):
        validate_patch(profile, {"x": 0.25}, document="desired")
    with pytest.raises(ProfileViolation, match="got boolean"):
        validate_patch(profile, {"x": True}, document="desired")


def test_array_without_element_spec_takes_scalars() -> None:
    profile = custom(PropertySpec("tags", T.ARRAY, writable=True, max_items=3))
    validate_patch(profile, {"tags": ["a", 2.5, True]}, document="reported")
    validate_patch(profile, {"tags": ["a", 1, False]}, document="desired")
    cases: list[tuple[JSON, str]] = [([{}], "object"), ([[1]], "array"), ([None], "null")]
    for bad, got in cases:
        with pytest.raises(ProfileViolation) as info:
            validate_patch(profile, {"tags": bad}, document="reported")
        assert info.value.path == "reported.tags[0]"
        assert info.value.reason == f"expected a scalar, got {got}"


def test_writable_member_of_read_only_object() -> None:
    profile = custom(
        PropertySpec("cfg", T.OBJECT),
        PropertySpec("cfg.mode", T.STRING, writable=True),
        PropertySpec("cfg.serial", T.STRING),
    )
    validate_patch(profile, {"cfg": {"mode": "eco"}}, document="desired")
    validate_patch(profile, {"cfg": {"mode": None}}, document="desired")
    with pytest.raises(ProfileViolation, match=r"desired\.cfg\.serial: is read-only"):
        validate_patch(profile, {"cfg": {"mode": "eco", "serial": "x"}}, document="desired")
    with pytest.raises(ProfileViolation, match=r"desired\.cfg: is read-only"):
        validate_patch(profile, {"cfg": None}, document="desired")


def test_read_only_member_of_writable_object() -> None:
    profile = custom(
        PropertySpec("cfg", T.OBJECT, writable=True),
        PropertySpec("cfg.mode", T.STRING),
    )
    validate_patch(profile, {"cfg": {}}, document="desired")
    validate_patch(profile, {"cfg": None}, document="desired")
    with pytest.raises(ProfileViolation, match=r"desired\.cfg\.mode: is read-only"):
        validate_patch(profile, {"cfg": {"mode": "x"}}, document="desired")


def test_validate_patch_stops_at_first_problem_in_patch_order() -> None:
    assert LAMP is not None
    with pytest.raises(ProfileViolation) as info:
        validate_patch(LAMP, {"power": "x", "brightness": 500}, document="desired")
    assert info.value.path == "desired.power"


# --- storage form ----------------------------------------------------------------------------


def test_custom_profile_round_trip() -> None:
    profile = replace(
        custom(
            PropertySpec("a", T.NUMBER, writable=True, minimum=-1, maximum=1.5, unit="V"),
            PropertySpec("b", T.STRING, allowed_values=("x", "y"), max_length=8),
            PropertySpec("c", T.ARRAY, max_items=2, description="cee"),
            PropertySpec("c[]", T.INTEGER),
        ),
        description="custom",
    )
    data = profile_to_dict(profile)
    assert json.loads(json.dumps(data)) == data
    assert data["properties"][1]["type"] == "string"
    assert profile_from_dict(json.loads(json.dumps(data))) == profile


def test_profile_from_dict_defaults() -> None:
    profile = profile_from_dict(
        {"model": "m", "kind": "lamp", "properties": [{"path": "a", "type": "boolean"}]}
    )
    assert profile == Profile("m", "lamp", (PropertySpec("a", T.BOOLEAN),))
    spec = profile.properties[0]
    assert (spec.writable, spec.minimum, spec.max_length, spec.max_items) == (False, None, 256, 64)


def _valid() -> dict[str, Any]:
    return {"model": "m", "kind": "lamp", "properties": [{"path": "a", "type": "boolean"}]}


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"model": None}, "'model' is missing"),
        ({"model": 5}, "'model' must be of type str"),
        ({"properties": "x"}, "'properties' must be of type list"),
        ({"properties": ["x"]}, "property 0 is not an object"),
        ({"properties": [{"path": "a"}]}, "'type' is missing"),
        ({"properties": [{"path": "a", "type": "text"}]}, "unknown type 'text'"),
        ({"properties": [{"type": "boolean"}]}, "'path' is missing"),
        ({"properties": [{"path": "a", "type": "number", "minimum": "0"}]}, "must be a number"),
        ({"properties": [{"path": "a", "type": "number", "minimum": True}]}, "must be a number"),
        ({"properties": [{"path": "a", "type": "string", "max_length": True}]}, "max_length"),
        ({"properties": [{"path": "a", "type": "string", "max_length": 2.5}]}, "max_length"),
        ({"properties": [{"path": "a", "type": "string", "writable": 1}]}, "writable"),
        (
            {"properties": [{"path": "a", "type": "string", "allowed_values": [1]}]},
            "allowed_values must be strings",
        ),
        ({"builtin": "yes"}, "'builtin'"),
    ],
)
def test_profile_from_dict_refuses(change: dict[str, Any], fragment: str) -> None:
    data = {**_valid(), **change}
    if change.get("model", "") is None:
        del data["model"]
    with pytest.raises(InvalidArgument) as info:
        profile_from_dict(data)
    assert fragment in str(info.value)


def test_profile_from_dict_missing_kind() -> None:
    data = _valid()
    del data["kind"]
    with pytest.raises(InvalidArgument, match="'kind' is missing"):
        profile_from_dict(data)
