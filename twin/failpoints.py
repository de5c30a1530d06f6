"""Fail points: named places where a test can make the server die on the spot, to prove that
what a crash there leaves behind is consistent (as etcd's gofail or TiKV's fail-rs do, with
nothing but the crash).

A fail point is armed by naming it in `CITYTWIN_FAILPOINTS` (comma-separated), read once when
the process starts; the process then exits at once with FAILPOINT_EXIT_CODE when it reaches
that point, with no cleanup, as a power cut or kill -9 would end it. Unarmed, a fail point is
one set lookup. Operators never set it.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

FAILPOINT_EXIT_CODE = 86
_ARMED = frozenset(
    name.strip() for name in os.environ.get("CITYTWIN_FAILPOINTS", "").split(",") if name.strip()
)


def failpoint(name: str) -> None:
    """Die here if the fail point `name` is armed."""
    if name in _ARMED:
        log.critical("fail point %s reached: exiting", name)
        os._exit(FAILPOINT_EXIT_CODE)
