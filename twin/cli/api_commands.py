"""API commands: the groups that talk to a running server over gRPC."""

from __future__ import annotations

from typing import Any

from twin.cli import (
    alarm_commands,
    device_commands,
    energy_commands,
    provisioning_commands,
    simulate_commands,
    twin_commands,
)


def register(commands: Any) -> None:
    """Add the API command groups: `devices`, `twin` and the provisioning groups (`install`,
    `enrollments`, `groups`, `certs`, `audit`) and `simulate`."""
    device_commands.register(commands)
    alarm_commands.register(commands)
    energy_commands.register(commands)
    twin_commands.register(commands)
    provisioning_commands.register(commands)
    simulate_commands.register(commands)
