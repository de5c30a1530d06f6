"""Which devices observe which of their twin documents over CoAP, and pushing changes to them.

Observations are kept per device, so a change notifies only that device's observers (aiocoap's
own ObservableResource would re-render every observer of the path, i.e. every device). Changes
are learnt from the change feed, not from the code path that made them: a desired update made
through gRPC on another replica sharing the PostgreSQL database reaches the observers held
here just the same (the feed's LISTEN/NOTIFY wakes this process).
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Callable
from enum import StrEnum
from typing import Any

from provisioning.device_certificates import forget_device
from twin import change_feed
from twin.change_feed import ChangeType, FeedNotifier
from twin.errors import OutOfRange
from twin.selectors import Selector

log = logging.getLogger(__name__)


class Document(StrEnum):
    """The observable views of a twin."""

    DESIRED = "desired"
    DELTA = "delta"


# What each kind of change may alter, so only the observers that can see a difference are
# re-rendered. Decommissioning ends every observation (the render answers 4.03).
_AFFECTED: dict[ChangeType, frozenset[Document]] = {
    ChangeType.DESIRED_UPDATED: frozenset({Document.DESIRED, Document.DELTA}),
    ChangeType.REPORTED_UPDATED: frozenset({Document.DELTA}),
    ChangeType.DEVICE_DECOMMISSIONED: frozenset(Document),
}


class DeviceObservers:
    """Live observations (aiocoap ServerObservation objects) by device and document."""

    def __init__(self) -> None:
        self._observations: dict[str, dict[Document, set[Any]]] = defaultdict(
            lambda: defaultdict(set)
        )

    def add(self, device_id: str, document: Document, observation: Any) -> Callable[[], None]:
        """Register `observation`; returns the function that removes it again."""
        self._observations[device_id][document].add(observation)

        def remove() -> None:
            documents = self._observations.get(device_id)
            if documents is None:
                return
            documents[document].discard(observation)
            if not documents[document]:
                del documents[document]
            if not documents:
                del self._observations[device_id]

        return remove

    def notify(self, device_id: str, documents: frozenset[Document] = frozenset(Document)) -> int:
        """Have the observers of `documents` of one device re-render; returns how many."""
        held = self._observations.get(device_id)
        if not held:
            return 0
        triggered = 0
        for document in documents:
            for observation in list(held.get(document, ())):
                observation.trigger()
                triggered += 1
        return triggered

    def notify_all(self) -> None:
        """Re-render every observation (after changes may have been missed)."""
        for device_id in list(self._observations):
            self.notify(device_id)

    def __len__(self) -> int:
        return sum(len(obs) for docs in self._observations.values() for obs in docs.values())


async def push_changes_forever(notifier: FeedNotifier, observers: DeviceObservers) -> None:
    """Follow the change feed from its current end and notify the affected observers."""
    while True:
        try:
            async for entry in change_feed.watch(notifier, Selector(), ""):
                change = ChangeType(entry.change_type)
                if change == ChangeType.DEVICE_DECOMMISSIONED:
                    # Its certificate must stop working here at once, not when cached
                    # identities expire; the re-render then refuses the observers.
                    forget_device(entry.device_id)
                affected = _AFFECTED.get(change)
                if affected:
                    observers.notify(entry.device_id, affected)
        except OutOfRange:
            # The feed was trimmed under us: whatever happened, re-render everything.
            observers.notify_all()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("following the change feed for observers failed; retrying")
            await asyncio.sleep(1.0)
            observers.notify_all()
