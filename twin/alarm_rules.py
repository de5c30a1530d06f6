"""Which alarms a report raises, refreshes or clears: pure rules over the profile's fault
properties (boolean properties with an alarm severity)."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from twin.merge_patch import Document
from twin.profiles import Profile

_ABSENT = object()


@dataclass(frozen=True)
class FaultChanges:
    """What one report does to a device's alarms (property paths)."""

    raised: tuple[str, ...] = ()
    seen_again: tuple[str, ...] = ()
    cleared: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.raised or self.seen_again or self.cleared)


def _lookup(document: Document, path: str) -> object:
    node: object = document
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return _ABSENT
        node = node[part]
    return node


def fault_changes(
    profile: Profile, reported: Document, report: Document, active: Collection[str]
) -> FaultChanges:
    """Compare the reported state after a report with the device's active alarms.

    A fault property that is now true raises an alarm unless one is active; if one is, and
    the report itself said true again (`report` is the patch as the device sent it, before
    no-op members were dropped), the alarm was seen again. A fault property that is not true
    (false, null, or gone) clears its active alarm.
    """
    raised, seen_again, cleared = [], [], []
    for spec in profile.fault_properties:
        on = _lookup(reported, spec.path) is True
        if on and spec.path not in active:
            raised.append(spec.path)
        elif on and _lookup(report, spec.path) is True:
            seen_again.append(spec.path)
        elif not on and spec.path in active:
            cleared.append(spec.path)
    return FaultChanges(tuple(raised), tuple(seen_again), tuple(cleared))
