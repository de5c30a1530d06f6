"""Which devices observe which of their twin documents over CoAP, and pushing changes to them.

Observations are kept per device, so a change notifies only that device's observers (aiocoap's
own ObservableResource would re-render every observer of the path, i.e. every device). Each is
a `PipeObservation` (pipe_observations.py): a small object per observer and no task while
nothing changes. Changes are learnt from the change feed, not from the code path that made
them: a desired update made through gRPC on another replica sharing the PostgreSQL database
reaches the observers held here just the same (the feed's LISTEN/NOTIFY wakes this process).
"""

from __future__ import annotations

import asyncio
import logging
from enum import StrEnum

from aiocoap.pipe import Pipe

from provisioning.device_certificates import forget_device
from twin import change_feed
from twin.change_feed import ChangeType, FeedNotifier
from twin.errors import OutOfRange
from twin.pipe_observations import PipeObservation, Renderer

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


class _DeviceObservation(PipeObservation):
    """An observation that knows where it is registered, so that it can leave by itself."""

    __slots__ = ("device_id", "document", "registry")

    def __init__(
        self,
        pipe: Pipe,
        renderer: Renderer,
        registry: DeviceObservers,
        device_id: str,
        document: Document,
    ) -> None:
        super().__init__(pipe, renderer)
        self.registry = registry
        self.device_id = device_id
        self.document = document

    def ended(self) -> None:
        self.registry.discard(self)


class DeviceObservers:
    """Live observations by device."""

    def __init__(self) -> None:
        # A device has one or two at a time: a list costs less than a set or a dict per device.
        self._observations: dict[str, list[_DeviceObservation]] = {}

    async def observe(
        self, pipe: Pipe, renderer: Renderer, device_id: str, document: Document
    ) -> None:
        """Serve the Observe: 0 request of `pipe` as an observation of `device_id`'s
        `document`: send its first answer rendered by `renderer`, and notifications rendered
        the same way on every change until one side ends it. Call it from the resource's
        `render_to_pipe` and return when it does."""
        observation = _DeviceObservation(pipe, renderer, self, device_id, document)
        # Registered before the first render, so a change made during it is not missed.
        self._observations.setdefault(device_id, []).append(observation)
        await observation.serve()

    def discard(self, observation: _DeviceObservation) -> None:
        """Forget `observation` (it has ended)."""
        held = self._observations.get(observation.device_id, [])
        if observation in held:
            held.remove(observation)
            if not held:
                del self._observations[observation.device_id]

    def notify(self, device_id: str, documents: frozenset[Document] = frozenset(Document)) -> int:
        """Have the observers of `documents` of one device re-render; returns how many."""
        held = self._observations.get(device_id)
        if not held:
            return 0
        affected = [o for o in held if o.document in documents]
        for observation in affected:
            observation.trigger()
        return len(affected)

    def notify_all(self) -> None:
        """Re-render every observation (after changes may have been missed)."""
        for device_id in list(self._observations):
            self.notify(device_id)

    def __len__(self) -> int:
        return sum(len(held) for held in self._observations.values())


async def push_changes_forever(notifier: FeedNotifier, observers: DeviceObservers) -> None:
    """Follow the change feed from its current end and notify the affected observers."""
    while True:
        try:
            async for headline in change_feed.headlines(notifier):
                change = headline.change_type
                if change == ChangeType.DEVICE_DECOMMISSIONED:
                    # Its certificate must stop working here at once, not when cached
                    # identities expire; the re-render then refuses the observers.
                    forget_device(headline.device_id)
                affected = _AFFECTED.get(change)
                if affected:
                    observers.notify(headline.device_id, affected)
        except OutOfRange:
            # The feed was trimmed under us: whatever happened, re-render everything.
            observers.notify_all()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("following the change feed for observers failed; retrying")
            await asyncio.sleep(1.0)
            observers.notify_all()
