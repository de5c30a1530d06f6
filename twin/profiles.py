"""Device profiles: per model, which twin properties exist, their types, ranges and writability.

A property path is a dotted path of object members; `x[]` names the elements of array `x` and
`x[].y` the member `y` of each (object) element. A child is declared only under a parent
declared as an OBJECT (or, for `x[]`, an ARRAY).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from functools import cached_property
from typing import Any, Literal

from twin.errors import InvalidArgument, ProfileViolation
from twin.merge_patch import JSON, Document
from twin.selectors import KINDS

MAX_PROPERTIES = 512
DEFAULT_HEARTBEAT_SECONDS = 300
MIN_HEARTBEAT_SECONDS = 10
MAX_HEARTBEAT_SECONDS = 86_400
_MODEL = re.compile(r"[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?")
# A member name optionally followed by `[]` (one per array level), e.g. `schedule[]`.
_SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,127}(\[\])*")


class PropertyType(StrEnum):
    """The JSON type of a property."""

    BOOLEAN = "boolean"
    INTEGER = "integer"
    NUMBER = "number"
    STRING = "string"
    OBJECT = "object"
    ARRAY = "array"


_NUMERIC = frozenset({PropertyType.INTEGER, PropertyType.NUMBER})


@dataclass(frozen=True)
class PropertySpec:
    """One property of a profile; ranges are inclusive, limits apply to strings and arrays."""

    path: str
    type: PropertyType
    writable: bool = False
    minimum: float | None = None
    maximum: float | None = None
    allowed_values: tuple[str, ...] = ()
    unit: str = ""
    description: str = ""
    max_length: int = 256
    max_items: int = 64
    # A BOOLEAN property that is a fault flag: reported true, it raises an alarm of this
    # severity; reported false (or removed), it clears it. Empty for ordinary properties.
    alarm_severity: str = ""


ALARM_SEVERITIES = ("critical", "major", "minor", "warning")


@dataclass(frozen=True)
class Profile:
    """The properties of one device model, and how often its devices check in."""

    model: str
    kind: str
    properties: tuple[PropertySpec, ...]
    description: str = ""
    builtin: bool = False
    # A device of this model contacts the service at least this often (a report, an
    # observation, a heartbeat); silent for much longer, it is considered offline.
    heartbeat_interval_seconds: int = DEFAULT_HEARTBEAT_SECONDS

    def spec(self, path: str) -> PropertySpec | None:
        """The spec declared for `path` (e.g. `dimming_schedule[].level`), if any."""
        return self._by_path.get(path)

    @property
    def fault_properties(self) -> tuple[PropertySpec, ...]:
        """The properties whose true value is an alarm."""
        return tuple(p for p in self.properties if p.alarm_severity)

    @cached_property
    def _by_path(self) -> dict[str, PropertySpec]:
        # The first declaration wins; check_profile refuses duplicates anyway.
        index: dict[str, PropertySpec] = {}
        for p in self.properties:
            index.setdefault(p.path, p)
        return index


def check_profile(profile: Profile) -> None:
    """InvalidArgument if `profile` is inconsistent (the message names the problem)."""
    if not _MODEL.fullmatch(profile.model):
        raise InvalidArgument(
            f"model {profile.model!r} must be 1-63 lowercase letters, digits, '.', '_' or '-', "
            "starting and ending with a letter or digit"
        )
    if profile.kind not in KINDS:
        raise InvalidArgument(
            f"unknown kind {profile.kind!r} for model {profile.model!r} "
            f"(expected {', '.join(KINDS[:-1])} or {KINDS[-1]})"
        )
    if not MIN_HEARTBEAT_SECONDS <= profile.heartbeat_interval_seconds <= MAX_HEARTBEAT_SECONDS:
        raise InvalidArgument(
            f"profile {profile.model!r}: heartbeat_interval_seconds must be "
            f"{MIN_HEARTBEAT_SECONDS}..{MAX_HEARTBEAT_SECONDS}"
        )
    if not profile.properties:
        raise InvalidArgument(f"profile {profile.model!r} declares no properties")
    if len(profile.properties) > MAX_PROPERTIES:
        raise InvalidArgument(
            f"profile {profile.model!r} declares {len(profile.properties)} properties; "
            f"the limit is {MAX_PROPERTIES}"
        )
    declared: dict[str, PropertySpec] = {}
    for p in profile.properties:
        if p.path in declared:
            raise InvalidArgument(f"property {p.path!r} is declared twice")
        declared[p.path] = p
    for p in profile.properties:
        _check_spec(p, declared)


def _check_spec(p: PropertySpec, declared: Mapping[str, PropertySpec]) -> None:
    where = f"property {p.path!r}"
    if not isinstance(p.path, str) or not all(_SEGMENT.fullmatch(s) for s in p.path.split(".")):
        raise InvalidArgument(
            f"{where}: malformed path (dotted member names of letters, digits, '_' and '-', "
            "each optionally followed by '[]')"
        )
    if not isinstance(p.type, PropertyType):
        raise InvalidArgument(f"{where}: unknown type {p.type!r}")
    if p.alarm_severity:
        if p.alarm_severity not in ALARM_SEVERITIES:
            raise InvalidArgument(
                f"{where}: alarm_severity must be one of {', '.join(ALARM_SEVERITIES)}"
            )
        if p.type is not PropertyType.BOOLEAN or "[]" in p.path:
            raise InvalidArgument(f"{where}: only boolean properties outside arrays raise alarms")
    if p.path.endswith("[]"):
        parent_path, parent_type = p.path[:-2], PropertyType.ARRAY
    elif "." in p.path:
        parent_path, parent_type = p.path.rsplit(".", 1)[0], PropertyType.OBJECT
    else:
        parent_path, parent_type = "", PropertyType.OBJECT
    if parent_path:
        parent = declared.get(parent_path)
        if parent is None:
            raise InvalidArgument(f"{where}: parent {parent_path!r} is not declared")
        if parent.type is not parent_type:
            raise InvalidArgument(
                f"{where}: parent {parent_path!r} is {parent.type.value}, not {parent_type.value}"
            )
    for name in ("minimum", "maximum"):
        bound = getattr(p, name)
        if bound is None:
            continue
        if p.type not in _NUMERIC:
            raise InvalidArgument(f"{where}: {name} is only for integer and number properties")
        if (
            isinstance(bound, bool)
            or not isinstance(bound, int | float)
            or not math.isfinite(bound)
        ):
            raise InvalidArgument(f"{where}: {name} must be a finite number")
    if p.minimum is not None and p.maximum is not None and p.minimum > p.maximum:
        raise InvalidArgument(
            f"{where}: minimum {_num(p.minimum)} is above maximum {_num(p.maximum)}"
        )
    if p.max_length < 1:
        raise InvalidArgument(f"{where}: max_length must be at least 1")
    if p.max_items < 1:
        raise InvalidArgument(f"{where}: max_items must be at least 1")
    if p.allowed_values:
        if p.type is not PropertyType.STRING:
            raise InvalidArgument(f"{where}: allowed_values is only for string properties")
        if len(set(p.allowed_values)) != len(p.allowed_values):
            raise InvalidArgument(f"{where}: allowed_values has duplicates")
        for value in p.allowed_values:
            if not isinstance(value, str) or len(value) > p.max_length:
                raise InvalidArgument(
                    f"{where}: allowed value {value!r} is not a string of at most "
                    f"{p.max_length} characters"
                )


def validate_patch(
    profile: Profile, patch: Document, *, document: Literal["desired", "reported"]
) -> None:
    """ProfileViolation for the first part of `patch` that breaks `profile`.

    Every member must be declared; values must match their spec's type, range, length, allowed
    values and item count. `reported` may set or delete any declared property. In `desired`,
    writability is checked on the spec of the exact path of every null (deletion), scalar and
    array; a non-empty object value is not itself checked but its members are, so a read-only
    object may hold writable members. An array is written whole: its elements are checked for
    type only. The violation's path starts with the document, e.g.
    `desired.dimming_schedule[2].level`.
    """
    _validate_members(profile, patch, "", document, writing_desired=document == "desired")


def _validate_members(
    profile: Profile,
    members: Document,
    spec_parent: str,
    shown_parent: str,
    *,
    writing_desired: bool,
) -> None:
    for key, value in members.items():
        spec_path = f"{spec_parent}.{key}" if spec_parent else key
        shown = f"{shown_parent}.{key}"
        spec = profile.spec(spec_path)
        if spec is None:
            raise ProfileViolation(shown, f"unknown property for model {profile.model}")
        recurses = spec.type is PropertyType.OBJECT and isinstance(value, dict) and bool(value)
        if writing_desired and not spec.writable and not recurses:
            raise ProfileViolation(shown, "is read-only")
        if value is not None:
            _validate_value(profile, spec, value, shown, writing_desired=writing_desired)


def _validate_value(
    profile: Profile, spec: PropertySpec, value: JSON, shown: str, *, writing_desired: bool
) -> None:
    expected = spec.type
    actual = json_type(value)
    if expected is PropertyType.NUMBER and actual is PropertyType.INTEGER:
        actual = PropertyType.NUMBER
    if actual is not expected:
        raise ProfileViolation(shown, f"expected {expected.value}, got {_type_name(value)}")
    if isinstance(value, int | float) and not isinstance(value, bool):
        if spec.minimum is not None and value < spec.minimum:
            raise ProfileViolation(
                shown, f"{_num(value)} is below the minimum {_num(spec.minimum)}"
            )
        if spec.maximum is not None and value > spec.maximum:
            raise ProfileViolation(
                shown, f"{_num(value)} is above the maximum {_num(spec.maximum)}"
            )
    elif isinstance(value, str):
        if len(value) > spec.max_length:
            raise ProfileViolation(
                shown, f"is {len(value)} characters long; the maximum is {spec.max_length}"
            )
        if spec.allowed_values and value not in spec.allowed_values:
            raise ProfileViolation(
                shown, f"{value!r} is not one of {', '.join(spec.allowed_values)}"
            )
    elif isinstance(value, dict):
        _validate_members(profile, value, spec.path, shown, writing_desired=writing_desired)
    elif isinstance(value, list):
        if len(value) > spec.max_items:
            raise ProfileViolation(
                shown, f"has {len(value)} items; the maximum is {spec.max_items}"
            )
        element = profile.spec(f"{spec.path}[]")
        for i, item in enumerate(value):
            item_shown = f"{shown}[{i}]"
            if element is None:
                if item is None or isinstance(item, dict | list):
                    raise ProfileViolation(item_shown, f"expected a scalar, got {_type_name(item)}")
                continue
            _validate_value(profile, element, item, item_shown, writing_desired=False)


def json_type(value: JSON) -> PropertyType | None:
    """The property type a JSON value has (INTEGER for ints, never NUMBER); None for null."""
    if isinstance(value, bool):
        return PropertyType.BOOLEAN
    if isinstance(value, int):
        return PropertyType.INTEGER
    if isinstance(value, float):
        return PropertyType.NUMBER
    if isinstance(value, str):
        return PropertyType.STRING
    if isinstance(value, dict):
        return PropertyType.OBJECT
    if isinstance(value, list):
        return PropertyType.ARRAY
    return None


def _type_name(value: JSON) -> str:
    kind = json_type(value)
    return "null" if kind is None else kind.value


def _num(value: float) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


# --- storage ---------------------------------------------------------------------------------


def profile_to_dict(profile: Profile) -> dict[str, Any]:
    """`profile` as JSON-able data (every field explicit); inverse of profile_from_dict."""
    return {
        "model": profile.model,
        "kind": profile.kind,
        "description": profile.description,
        "builtin": profile.builtin,
        "heartbeat_interval_seconds": profile.heartbeat_interval_seconds,
        "properties": [
            {
                "path": p.path,
                "type": p.type.value,
                "writable": p.writable,
                "minimum": p.minimum,
                "maximum": p.maximum,
                "allowed_values": list(p.allowed_values),
                "unit": p.unit,
                "description": p.description,
                "max_length": p.max_length,
                "max_items": p.max_items,
                "alarm_severity": p.alarm_severity,
            }
            for p in profile.properties
        ],
    }


def profile_from_dict(data: Mapping[str, Any]) -> Profile:
    """The Profile stored as `data` (missing optional fields take their defaults).

    InvalidArgument if a field is missing or has the wrong type; consistency is check_profile's
    job.
    """
    properties = _get(data, "properties", list, None)
    specs: list[PropertySpec] = []
    for i, item in enumerate(properties):
        if not isinstance(item, Mapping):
            raise InvalidArgument(f"profile property {i} is not an object")
        type_name = _get(item, "type", str, None)
        try:
            kind = PropertyType(type_name)
        except ValueError:
            raise InvalidArgument(f"profile property {i}: unknown type {type_name!r}") from None
        allowed = _get(item, "allowed_values", list, [])
        if not all(isinstance(v, str) for v in allowed):
            raise InvalidArgument(f"profile property {i}: allowed_values must be strings")
        specs.append(
            PropertySpec(
                path=_get(item, "path", str, None),
                type=kind,
                writable=_get(item, "writable", bool, False),
                minimum=_bound(item, "minimum"),
                maximum=_bound(item, "maximum"),
                allowed_values=tuple(allowed),
                unit=_get(item, "unit", str, ""),
                description=_get(item, "description", str, ""),
                max_length=_get(item, "max_length", int, 256),
                max_items=_get(item, "max_items", int, 64),
                alarm_severity=_get(item, "alarm_severity", str, ""),
            )
        )
    return Profile(
        model=_get(data, "model", str, None),
        kind=_get(data, "kind", str, None),
        properties=tuple(specs),
        description=_get(data, "description", str, ""),
        builtin=_get(data, "builtin", bool, False),
        heartbeat_interval_seconds=_get(
            data, "heartbeat_interval_seconds", int, DEFAULT_HEARTBEAT_SECONDS
        ),
    )


def _get(data: Mapping[str, Any], name: str, kind: type, default: Any) -> Any:
    if name not in data or data[name] is None:
        if default is None:
            raise InvalidArgument(f"profile field {name!r} is missing")
        return default
    value = data[name]
    # bool is an int subclass; an int field must not take true/false.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise InvalidArgument(f"profile field {name!r} must be of type {kind.__name__}")
    return value


def _bound(item: Mapping[str, Any], name: str) -> float | None:
    value = item.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgument(f"profile field {name!r} must be a number")
    return float(value)
