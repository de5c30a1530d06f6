"""API commands: the groups that talk to a running server over gRPC."""

from __future__ import annotations

from typing import Any

from twin.cli import device_commands, twin_commands


def register(commands: Any) -> None:
    """Add the API command groups: `devices` and `twin`."""
    device_commands.register(commands)
    twin_commands.register(commands)
