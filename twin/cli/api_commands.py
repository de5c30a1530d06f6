"""API commands (devices, twin); filled in by the CLI module owner."""

from __future__ import annotations

from typing import Any


def register(commands: Any) -> None:
    """Add the API command groups."""
