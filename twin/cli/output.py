"""Showing results to people: tables with rich, or JSON."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC
from typing import Any, TypeVar

from google.protobuf import json_format
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

_UNBOUNDED_WIDTH = 100_000


def print_table(records: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
    """Print records as a table with the given columns."""
    table = _table(columns)
    for record in records:
        table.add_row(*(Text(str(record.get(c, ""))) for c in columns))
    _print(table)


def print_key_values(rows: Sequence[tuple[str, str]]) -> None:
    """Print one record as a two-column field/value table."""
    table = _table(["field", "value"])
    for key, value in rows:
        table.add_row(Text(key), Text(value))
    _print(table)


def _table(columns: Sequence[str]) -> Table:
    table = Table(show_edge=False, header_style="bold")
    for column in columns:
        # Ids and names must survive whole: wrap long cells, never cut them with an ellipsis.
        table.add_column(column, overflow="fold")
    return table


def _print(table: Table) -> None:
    console = Console(soft_wrap=True)
    if not console.is_terminal:
        # Piped output has no width to respect; rich would otherwise squeeze it into 80
        # columns, folding the ids that scripts and grep look for.
        wide = console.options.update(max_width=_UNBOUNDED_WIDTH)
        width = Measurement.get(console, wide, table).maximum
        console = Console(soft_wrap=True, width=max(width, 1))
    console.print(table)


def tidy_json(value: Any) -> Any:
    """`value` with whole floats turned into ints: protobuf Struct holds every number as a
    double, so 40 comes back as 40.0."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: tidy_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [tidy_json(v) for v in value]
    return value


def message_to_dict(message: Message) -> dict[str, Any]:
    """A protobuf message as a JSON-ready dict: proto field names, zero values included."""
    result: dict[str, Any] = tidy_json(
        json_format.MessageToDict(
            message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
    )
    return result


def print_json(value: Any, *, compact: bool = False) -> None:
    """Print a JSON value: indented, or on one line with `compact` (for streams)."""
    if compact:
        print(json.dumps(value, separators=(",", ":")), flush=True)
    else:
        print(json.dumps(value, indent=2))


def compact_json(value: Any) -> str:
    """A JSON value on one short line, keys sorted (protobuf maps have no order)."""
    return json.dumps(tidy_json(value), separators=(",", ":"), sort_keys=True)


def pretty_json(value: Any) -> str:
    """A JSON value indented for reading in a table cell, keys sorted."""
    return json.dumps(tidy_json(value), indent=2, sort_keys=True)


def format_time(timestamp: Timestamp | None) -> str:
    """An RFC 3339 time in UTC, or "" for a field that is not set (None)."""
    if timestamp is None:
        return ""
    return str(timestamp.ToDatetime(tzinfo=UTC).isoformat(timespec="seconds"))


def short_name(name: str) -> str:
    """The id part of a resource name, for table cells."""
    return name.partition("/")[2] or name


def time_of(message: Message, field: str) -> str:
    """A timestamp field as RFC 3339, or "" when it is not set."""
    return format_time(getattr(message, field) if message.HasField(field) else None)


def show(message: Message, fields: Mapping[str, str], as_json: bool) -> None:
    """One record: its fields as a key/value table, or the whole message as JSON."""
    if as_json:
        print_json(message_to_dict(message))
    else:
        print_key_values(list(fields.items()))


Record = TypeVar("Record", bound=Message)


def show_all(
    messages: Sequence[Record],
    fields: Callable[[Record], Mapping[str, str]],
    columns: Sequence[str],
    as_json: bool,
) -> None:
    """Records as a table with `columns`, or as a JSON list."""
    if as_json:
        print_json([message_to_dict(m) for m in messages])
    else:
        print_table([fields(m) for m in messages], columns)
