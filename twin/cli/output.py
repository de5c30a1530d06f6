"""Showing results to people: tables with rich, or JSON."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table


def print_table(records: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
    """Print records as a table with the given columns."""
    table = Table(*columns, show_edge=False, header_style="bold")
    for record in records:
        table.add_row(*(str(record.get(c, "")) for c in columns))
    Console(soft_wrap=True).print(table)
