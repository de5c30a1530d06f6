"""Fleet selectors: `kind=lamp,district=north,firmware.version!=2.1.0`.

A selector is an AND of terms. Grammar (whitespace around tokens is ignored):

    selector := "" | term ("," term)*            at most 32 terms, 1024 characters
    term     := key op value | key ("in" | "notin") "(" value ("," value)* ")"
              | key | "!" key | key ("<" | "<=" | ">" | ">=") number
    op       := "=" | "==" | "!="
    value    := unquoted | '"' chars '"'         inside quotes, backslash escapes the next char

Unquoted values may not contain whitespace, quotes, backslashes or any of `,()=!<>`.

Keys: the device attributes `id kind model state serial site online`; labels as `labels.<key>`
or a bare key; twin values as `reported.<path>` or `desired.<path>`, any other dotted key being
shorthand for `reported.<key>`; `has_delta`; and `sync` (in-sync, pending, stale, rejected).
Label and attribute values compare as strings; twin values compare by the type of the stored
value (number numerically, boolean with true/false, string as text; arrays and objects never
equal). `!=` and `notin` match when the key is absent,
as in Kubernetes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from twin.errors import SelectorError
from twin.merge_patch import JSON, Document

MAX_SELECTOR_LENGTH = 1024
MAX_TERMS = 32

KINDS = ("lamp", "sensor", "camera")
STATES = ("registered", "provisioned", "active", "decommissioned")
ATTRIBUTES = ("id", "kind", "model", "state", "serial", "site", "online")
# The reconciliation states of a twin (twin/reconciliation.py SyncState).
SYNC_STATES = ("in-sync", "pending", "stale", "rejected")
# Attributes the database can filter on directly; `site` lives in the location columns.
_PUSHDOWN_ATTRIBUTES = ("id", "kind", "model", "state", "serial")
_RESERVED = frozenset({*ATTRIBUTES, "has_delta", "sync", "labels", "reported", "desired"})

_LABEL_KEY = re.compile(r"[a-z0-9]([a-z0-9_-]*[a-z0-9])?")
MAX_LABEL_KEY_LENGTH = 63
MAX_PATH_SEGMENT_LENGTH = 128
_KEY = re.compile(r'[^\s=!<>(),"\\]+')
_SPECIAL = frozenset(',()=!<>"\\')
_NUMBER = re.compile(r"-?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_INTEGER = re.compile(r"-?\d+")


class Space(StrEnum):
    """What a term's key names."""

    ATTRIBUTE = "attribute"
    LABEL = "label"
    REPORTED = "reported"
    DESIRED = "desired"
    HAS_DELTA = "has_delta"
    SYNC = "sync"


class Op(StrEnum):
    """A term's operator."""

    EQ = "="
    NE = "!="
    IN = "in"
    NOTIN = "notin"
    EXISTS = "exists"
    NOT_EXISTS = "!exists"
    LT = "<"
    LE = "<="
    GT = ">"
    GE = ">="


_TWIN_SPACES = frozenset({Space.REPORTED, Space.DESIRED, Space.HAS_DELTA, Space.SYNC})
_NUMERIC_OPS = frozenset({Op.LT, Op.LE, Op.GT, Op.GE})


@dataclass(frozen=True)
class Term:
    """One condition: `field` in `space` (attribute name, label key, dotted twin path or
    `has_delta`), compared by `op` with `values` (none for the existence tests)."""

    space: Space
    field: str
    op: Op
    values: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        """The key as canonical selector text."""
        if self.space in (Space.REPORTED, Space.DESIRED):
            return f"{self.space.value}.{self.field}"
        if self.space is Space.LABEL and self.field in _RESERVED:
            return f"labels.{self.field}"
        return self.field

    def __str__(self) -> str:
        if self.op is Op.EXISTS:
            return self.key
        if self.op is Op.NOT_EXISTS:
            return f"!{self.key}"
        if self.op in (Op.IN, Op.NOTIN):
            return f"{self.key} {self.op.value} ({','.join(_quote(v) for v in self.values)})"
        return f"{self.key}{self.op.value}{_quote(self.values[0])}"


@dataclass(frozen=True)
class Selector:
    """An AND of terms; no terms matches every device."""

    terms: tuple[Term, ...] = ()

    def __str__(self) -> str:
        return ",".join(str(t) for t in self.terms)

    @property
    def uses_twin_values(self) -> bool:
        """Whether matching needs the twin (a reported., desired., has_delta or sync term)."""
        return any(t.space in _TWIN_SPACES for t in self.terms)

    def combine(self, other: Selector) -> Selector:
        """The selector matching what both match (terms of `other` already here are dropped).

        The result may exceed the parser's term or length limits.
        """
        return Selector(self.terms + tuple(t for t in other.terms if t not in self.terms))

    def exact_attributes(self) -> dict[str, str]:
        """Equalities on id, kind, model, state and serial, for a database prefilter.

        Of contradicting terms the first wins; matching stays the authority.
        """
        result: dict[str, str] = {}
        for t in self.terms:
            if t.space is Space.ATTRIBUTE and t.op is Op.EQ and t.field in _PUSHDOWN_ATTRIBUTES:
                result.setdefault(t.field, t.values[0])
        return result


@dataclass(frozen=True)
class Subject:
    """A device as selectors see it; the twin parts are needed only by twin-value terms."""

    id: str
    kind: str
    model: str
    state: str
    serial: str
    site: str
    labels: Mapping[str, str]
    desired: Document | None = None
    reported: Document | None = None
    has_delta: bool | None = None
    online: bool = False
    sync: str | None = None


def parse_selector(text: str) -> Selector:
    """Parse selector text; SelectorError (quoting the offending term) if it is malformed."""
    if len(text) > MAX_SELECTOR_LENGTH:
        raise SelectorError(
            f"selector is {len(text)} characters long; the limit is {MAX_SELECTOR_LENGTH}"
        )
    if any(ord(c) < 32 or ord(c) == 127 for c in text if c not in " \t\n\r"):
        raise SelectorError("selector contains a control character")
    if not text.strip():
        return Selector()
    try:
        parts = _split(text)
    except _SplitError as e:
        excerpt = text.strip() if len(text) <= 80 else text.strip()[:77] + "..."
        raise SelectorError(f"selector {excerpt!r}: {e}") from None
    if len(parts) > MAX_TERMS:
        raise SelectorError(f"selector has {len(parts)} terms; the limit is {MAX_TERMS}")
    return Selector(tuple(_parse_term(p.strip()) for p in parts))


def matches(selector: Selector, subject: Subject) -> bool:
    """Whether `subject` satisfies every term of `selector`.

    ValueError if a twin-value term meets a subject without that twin part loaded (check
    `selector.uses_twin_values` before building the subject).
    """
    return all(_matches_term(t, subject) for t in selector.terms)


# --- parsing ---------------------------------------------------------------------------------


class _SplitError(Exception):
    pass


def _split(text: str) -> list[str]:
    """Split on commas outside double quotes and parentheses; _SplitError if unbalanced."""
    parts: list[str] = []
    start = 0
    depth = 0
    quoted = False
    i = 0
    while i < len(text):
        c = text[i]
        if quoted:
            if c == "\\":
                i += 1
            elif c == '"':
                quoted = False
        elif c == '"':
            quoted = True
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth < 0:
                raise _SplitError("unbalanced ')'")
        elif c == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
        i += 1
    if quoted:
        raise _SplitError("unterminated quoted value")
    if depth:
        raise _SplitError("unbalanced '('")
    parts.append(text[start:])
    return parts


def _error(term: str, reason: str) -> SelectorError:
    return SelectorError(f"selector term {term!r}: {reason}")


def _parse_term(term: str) -> Term:
    if not term:
        raise SelectorError("selector has an empty term (two commas in a row, or a stray comma)")
    if term.startswith("!"):
        key_text = term[1:].strip()
        if not _KEY.fullmatch(key_text):
            raise _error(term, "'!' must be followed by a key alone")
        space, field = _parse_key(term, key_text)
        return _checked(term, Term(space, field, Op.NOT_EXISTS))
    key_match = _KEY.match(term)
    if key_match is None:
        raise _error(term, "expected a key")
    space, field = _parse_key(term, key_match.group())
    rest = term[key_match.end() :].lstrip()
    if not rest:
        return _checked(term, Term(space, field, Op.EXISTS))
    for token, op in (
        ("==", Op.EQ),
        ("!=", Op.NE),
        ("<=", Op.LE),
        (">=", Op.GE),
        ("=", Op.EQ),
        ("<", Op.LT),
        (">", Op.GT),
    ):
        if rest.startswith(token):
            value = _parse_value(term, rest[len(token) :])
            return _checked(term, Term(space, field, op, (value,)))
    set_match = re.fullmatch(r"(in|notin)\s*\((.*)\)", rest, re.DOTALL)
    if set_match is None:
        raise _error(
            term, "expected =, ==, !=, <, <=, >, >=, in (...) or notin (...) after the key"
        )
    try:
        items = _split(set_match.group(2))
    except _SplitError as e:
        raise _error(term, str(e)) from None
    values = tuple(_parse_value(term, item) for item in items)
    op = Op.IN if set_match.group(1) == "in" else Op.NOTIN
    return _checked(term, Term(space, field, op, values))


def _parse_key(term: str, key: str) -> tuple[Space, str]:
    if key in ATTRIBUTES:
        return Space.ATTRIBUTE, key
    if key == "has_delta":
        return Space.HAS_DELTA, key
    if key == "sync":
        return Space.SYNC, key
    head, dot, tail = key.partition(".")
    if not dot:
        if key in _RESERVED:
            raise _error(term, f"{key!r} needs a key or path after it, e.g. '{key}.name'")
        return Space.LABEL, _label_key(term, key)
    if head == "labels":
        return Space.LABEL, _label_key(term, tail)
    if head in ("reported", "desired"):
        return Space(head), _twin_path(term, tail)
    return Space.REPORTED, _twin_path(term, key)


def _label_key(term: str, key: str) -> str:
    if len(key) > MAX_LABEL_KEY_LENGTH or not _LABEL_KEY.fullmatch(key):
        raise _error(
            term,
            f"{key!r} is not a valid label key (lowercase letters, digits, '-' and '_', "
            f"starting and ending with a letter or digit, at most {MAX_LABEL_KEY_LENGTH} "
            "characters)",
        )
    return key


def _twin_path(term: str, path: str) -> str:
    for segment in path.split("."):
        if not segment:
            raise _error(term, f"twin path {path!r} has an empty member name")
        if len(segment) > MAX_PATH_SEGMENT_LENGTH or "[" in segment or "]" in segment:
            raise _error(
                term,
                f"twin path {path!r}: member {segment[:32]!r} must be at most "
                f"{MAX_PATH_SEGMENT_LENGTH} characters without '[' or ']' "
                "(array elements cannot be selected)",
            )
    return path


def _parse_value(term: str, text: str) -> str:
    text = text.strip()
    if not text:
        raise _error(term, 'missing value (write "" for an empty string)')
    if text.startswith('"'):
        chars: list[str] = []
        i = 1
        while i < len(text):
            c = text[i]
            if c == "\\" and i + 1 < len(text):
                chars.append(text[i + 1])
                i += 2
                continue
            if c == '"':
                if text[i + 1 :].strip():
                    raise _error(term, "unexpected text after a quoted value")
                return "".join(chars)
            chars.append(c)
            i += 1
        raise _error(term, "unterminated quoted value")
    bad = sorted({c for c in text if c in _SPECIAL or c.isspace()})
    if bad:
        shown = " ".join("space" if c.isspace() else c for c in bad)
        raise _error(term, f"value {text!r} contains {shown}; put it in double quotes")
    return text


def _checked(term: str, t: Term) -> Term:
    """Check that the operator and values fit the key; canonicalise enumerated values."""
    if t.space is Space.HAS_DELTA:
        if t.op is not Op.EQ or t.values[0].lower() not in ("true", "false"):
            raise _error(term, "has_delta takes only =true or =false")
        return Term(t.space, t.field, t.op, (t.values[0].lower(),))
    if t.op in _NUMERIC_OPS:
        if t.space not in (Space.REPORTED, Space.DESIRED):
            raise _error(term, f"{t.op.value} compares numbers and works only on twin values")
        if _number(t.values[0]) is None:
            raise _error(term, f"{t.values[0]!r} is not a number")
        return t
    if t.space is Space.ATTRIBUTE:
        if t.op in (Op.EXISTS, Op.NOT_EXISTS):
            raise _error(
                term, f"device attribute {t.field!r} always exists; compare it with = or !="
            )
        if t.field == "kind":
            return Term(t.space, t.field, t.op, _enumerated(term, t.values, "kind", KINDS))
        if t.field == "state":
            return Term(t.space, t.field, t.op, _enumerated(term, t.values, "state", STATES))
        if t.field == "online":
            allowed = ("true", "false")
            return Term(t.space, t.field, t.op, _enumerated(term, t.values, "online", allowed))
    if t.space is Space.SYNC:
        if t.op in (Op.EXISTS, Op.NOT_EXISTS):
            raise _error(term, "sync always has a value; compare it with =, !=, in or notin")
        return Term(t.space, t.field, t.op, _enumerated(term, t.values, "sync", SYNC_STATES))
    return t


def _enumerated(
    term: str, values: tuple[str, ...], what: str, allowed: tuple[str, ...]
) -> tuple[str, ...]:
    result = tuple(v.lower() for v in values)
    for value, canonical in zip(values, result, strict=True):
        if canonical not in allowed:
            expected = f"{', '.join(allowed[:-1])} or {allowed[-1]}"
            raise _error(term, f"unknown {what} {value!r} (expected {expected})")
    return result


def _quote(value: str) -> str:
    if value and not any(c in _SPECIAL or c.isspace() for c in value):
        return value
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _number(text: str) -> int | float | None:
    if _INTEGER.fullmatch(text):
        return int(text)
    if _NUMBER.fullmatch(text):
        value = float(text)
        return value if math.isfinite(value) else None
    return None


# --- matching --------------------------------------------------------------------------------

_MISSING = object()


def _matches_term(t: Term, subject: Subject) -> bool:
    if t.space is Space.HAS_DELTA:
        if subject.has_delta is None:
            raise ValueError(f"selector term {str(t)!r} needs the subject's has_delta")
        return subject.has_delta is (t.values[0] == "true")
    if t.space is Space.SYNC:
        if subject.sync is None:
            raise ValueError(f"selector term {str(t)!r} needs the subject's sync status")
        return _compare_strings(t, subject.sync)
    if t.space is Space.ATTRIBUTE:
        if t.field == "online":
            return _compare_strings(t, "true" if subject.online else "false")
        actual: str = getattr(subject, t.field)
        if t.field in ("kind", "state"):
            actual = actual.lower()
        return _compare_strings(t, actual)
    if t.space is Space.LABEL:
        label = subject.labels.get(t.field)
        if t.op is Op.EXISTS:
            return label is not None
        if t.op is Op.NOT_EXISTS:
            return label is None
        return _compare_strings(t, label)
    document = subject.reported if t.space is Space.REPORTED else subject.desired
    if document is None:
        raise ValueError(f"selector term {str(t)!r} needs the subject's {t.space.value} document")
    value = _lookup(document, t.field)
    if t.op is Op.EXISTS:
        return value is not _MISSING
    if t.op is Op.NOT_EXISTS:
        return value is _MISSING
    if t.op in _NUMERIC_OPS:
        return _compare_number(t, value)
    hit = value is not _MISSING and any(_twin_equal(value, v) for v in t.values)
    return hit if t.op in (Op.EQ, Op.IN) else not hit


def _compare_strings(t: Term, actual: str | None) -> bool:
    hit = actual is not None and actual in t.values
    return hit if t.op in (Op.EQ, Op.IN) else not hit


def _lookup(document: Document, path: str) -> object:
    node: JSON = document
    for segment in path.split("."):
        if not isinstance(node, dict) or segment not in node:
            return _MISSING
        node = node[segment]
    return node


def _twin_equal(value: object, text: str) -> bool:
    if isinstance(value, bool):
        return text == ("true" if value else "false")
    if isinstance(value, int | float):
        number = _number(text)
        return number is not None and value == number
    if isinstance(value, str):
        return value == text
    return False


def _compare_number(t: Term, value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    bound = _number(t.values[0])
    assert bound is not None  # checked when parsed
    if t.op is Op.LT:
        return value < bound
    if t.op is Op.LE:
        return value <= bound
    if t.op is Op.GT:
        return value > bound
    return value >= bound
