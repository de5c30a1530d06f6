"""The reconciler's loop: re-notify devices whose twin stays PENDING, with backoff.

A desired change reaches observing devices at once through the change feed; this is the
safety net for a device that missed or ignored it. Every replica runs the loop; a due twin is
claimed under its row lock with the due time re-checked, so one replica records each attempt.
A replica notifies only the observations it holds, so a device observing through another
replica is re-notified when that replica claims the attempt (the backoff makes that soon).
"""

from __future__ import annotations

from datetime import UTC, datetime

from tortoise.transactions import in_transaction

from twin.device_observers import DeviceObservers, Document
from twin.models import Device, Twin
from twin.registry import view_of
from twin.sync_store import record_renotification

_BATCH = 200
_DOCUMENTS = frozenset({Document.DESIRED, Document.DELTA})


async def renotify_due(observers: DeviceObservers) -> int:
    """Notify (again) the devices whose twins are due; returns how many were claimed."""
    now = datetime.now(UTC)
    due = (
        await Twin.filter(next_push_at__lte=now)
        .order_by("next_push_at")
        .limit(_BATCH)
        .values_list("device_id", flat=True)
    )
    claimed = 0
    for device_id in due:
        async with in_transaction() as conn:
            row = (
                await Twin.filter(device_id=device_id, next_push_at__lte=now)
                .using_db(conn)
                .select_for_update()
                .first()
            )
            device = await Device.filter(id=device_id).using_db(conn).first()
            if row is None or device is None:
                continue  # another replica claimed it, or it is gone
            observers.notify(str(device_id), _DOCUMENTS)
            if record_renotification(row, view_of(device).subject, now):
                await row.save(using_db=conn, update_fields=["sync", "next_push_at"])
            claimed += 1
    return claimed
