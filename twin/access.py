"""Who may do what: roles, their permissions, and the authenticated caller (Principal).

A token has one role and optionally a scope, a selector on device attributes; a scoped caller
only ever sees and touches the devices its scope matches (an installer for district north).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from enum import StrEnum

from twin.errors import InvalidArgument, PermissionDenied
from twin.selectors import Selector, Subject, matches, parse_selector


class Role(StrEnum):
    """The roles a token can carry."""

    ADMIN = "admin"
    SERVICE = "service"
    INSTALLER = "installer"
    RELEASE_ENGINEER = "release-engineer"
    VIEWER = "viewer"
    # Not a token role: a device authenticated by its certificate, acting on itself.
    DEVICE = "device"


class Permission(StrEnum):
    """One kind of action; each RPC needs exactly one."""

    DEVICES_READ = "devices.read"
    DEVICES_CREATE = "devices.create"
    DEVICES_UPDATE = "devices.update"
    DEVICES_DECOMMISSION = "devices.decommission"
    TWINS_READ = "twins.read"
    DESIRED_WRITE = "twins.desired.write"
    REPORTED_WRITE = "twins.reported.write"
    FEED_WATCH = "feed.watch"
    PROFILES_READ = "profiles.read"
    PROFILES_WRITE = "profiles.write"
    ENROLLMENTS_READ = "enrollments.read"
    ENROLLMENTS_CREATE = "enrollments.create"
    ENROLLMENTS_CANCEL = "enrollments.cancel"
    GROUPS_READ = "enrollment-groups.read"
    GROUPS_WRITE = "enrollment-groups.write"
    CERTIFICATES_READ = "certificates.read"
    CERTIFICATES_REVOKE = "certificates.revoke"
    POLICY_READ = "provisioning-policy.read"
    POLICY_WRITE = "provisioning-policy.write"
    AUDIT_READ = "audit.read"
    ALARMS_READ = "alarms.read"
    ALARMS_ACKNOWLEDGE = "alarms.acknowledge"
    FIRMWARE_READ = "firmware.read"
    FIRMWARE_WRITE = "firmware.write"
    RELEASE_KEYS_WRITE = "release-keys.write"
    CAMPAIGNS_READ = "campaigns.read"
    CAMPAIGNS_WRITE = "campaigns.write"


_READ = frozenset(
    {
        Permission.DEVICES_READ,
        Permission.TWINS_READ,
        Permission.FEED_WATCH,
        Permission.PROFILES_READ,
        Permission.ENROLLMENTS_READ,
        Permission.GROUPS_READ,
        Permission.CERTIFICATES_READ,
        Permission.POLICY_READ,
        Permission.AUDIT_READ,
        Permission.ALARMS_READ,
        Permission.FIRMWARE_READ,
        Permission.CAMPAIGNS_READ,
    }
)

ROLE_PERMISSIONS: dict[Role, frozenset[Permission]] = {
    Role.ADMIN: frozenset(Permission),
    # Other city services: read everything, steer devices, bridge reports from gateways.
    Role.SERVICE: _READ
    | {Permission.DESIRED_WRITE, Permission.REPORTED_WRITE, Permission.ALARMS_ACKNOWLEDGE},
    # On site: register and enroll devices and fix their labels and location, never steer
    # them; revoking identities and trusting manufacturers stay with admins.
    Role.INSTALLER: _READ
    | {
        Permission.DEVICES_CREATE,
        Permission.DEVICES_UPDATE,
        Permission.ENROLLMENTS_CREATE,
        Permission.ENROLLMENTS_CANCEL,
        Permission.ALARMS_ACKNOWLEDGE,
    },
    # Upload signed firmware and roll it out; which keys are trusted stays with admins, so a
    # release engineer cannot sign and trust their own images.
    Role.RELEASE_ENGINEER: _READ | {Permission.FIRMWARE_WRITE, Permission.CAMPAIGNS_WRITE},
    Role.VIEWER: _READ,
    Role.DEVICE: frozenset({Permission.TWINS_READ, Permission.REPORTED_WRITE}),
}


TOKEN_ROLES = tuple(r for r in Role if r != Role.DEVICE)


def parse_role(text: str) -> Role:
    """The token Role named `text`, or InvalidArgument listing the valid ones."""
    if text not in TOKEN_ROLES:
        raise InvalidArgument(
            f"unknown role {text!r} (expected one of {', '.join(r.value for r in TOKEN_ROLES)})"
        )
    return Role(text)


def parse_scope(text: str) -> Selector:
    """A token scope: a selector on device attributes only (twin values change under it)."""
    scope = parse_selector(text)
    if scope.uses_twin_values:
        raise InvalidArgument(f"scope {text!r} may only use device attributes and labels")
    return scope


@dataclass(frozen=True)
class Principal:
    """An authenticated caller."""

    token_id: int
    role: Role
    scope: Selector

    def require(self, permission: Permission) -> None:
        """Raise PermissionDenied unless the role grants `permission`."""
        if permission not in ROLE_PERMISSIONS[self.role]:
            raise PermissionDenied(f"role {self.role} may not {permission}")

    def require_device(self, subject: Subject) -> None:
        """Raise PermissionDenied unless the device lies within the caller's scope."""
        if not matches(self.scope, subject):
            raise PermissionDenied(f"device {subject.id} is outside the token's scope")


# Asked for on every request a device makes; parsing its scope each time showed in profiles.
@functools.lru_cache(maxsize=16_384)
def device_principal(device_id: str) -> Principal:
    """A device authenticated by its certificate: it may only read its twin and report, and
    its scope is itself, so every store call refuses any other device."""
    return Principal(token_id=0, role=Role.DEVICE, scope=parse_selector(f"id={device_id}"))
