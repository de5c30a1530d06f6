"""Throttling of failed enrollment attempts, per source address and per serial number.

A key (an address, a serial) that failed `max_failures` times within `window_seconds` is
refused until its oldest counted failure leaves the window; the caller learns how long that is
(CoAP 4.29 with Max-Age). Only failures count, so a device that enrolls correctly is never
slowed down, while guessing codes costs an attacker the window per few guesses.

The state is in memory, per replica: it bounds a guesser's rate by the number of replicas,
which is fine for codes of 80 bits. The number of tracked keys is bounded too (least
recently failed keys are forgotten first), so a flood of spoofed sources cannot grow memory.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from dataclasses import dataclass, field


@dataclass
class FailureLimiter:
    """Counts recent failures per key and tells when a key must wait."""

    max_failures: int = 5
    window_seconds: float = 300.0
    max_keys: int = 100_000
    _failures: OrderedDict[str, deque[float]] = field(default_factory=OrderedDict)

    def retry_after(self, key: str, now: float) -> int:
        """Seconds `key` must still wait (0 if it may try now); rounded up, at least 1 when
        blocked, so it fits a CoAP Max-Age."""
        times = self._recent(key, now)
        if times is None or len(times) < self.max_failures:
            return 0
        # The attempt becomes possible once enough failures have aged out of the window.
        oldest_counted = times[len(times) - self.max_failures]
        return max(1, math.ceil(oldest_counted + self.window_seconds - now))

    def record_failure(self, key: str, now: float) -> None:
        """Count one failure of `key` at `now`."""
        times = self._recent(key, now)
        if times is None:
            times = deque()
            self._failures[key] = times
        times.append(now)
        # Older failures beyond the limit can never matter again.
        while len(times) > self.max_failures:
            times.popleft()
        self._failures.move_to_end(key)
        while len(self._failures) > self.max_keys:
            self._failures.popitem(last=False)

    def _recent(self, key: str, now: float) -> deque[float] | None:
        times = self._failures.get(key)
        if times is None:
            return None
        while times and times[0] <= now - self.window_seconds:
            times.popleft()
        if not times:
            del self._failures[key]
            return None
        return times

    def __len__(self) -> int:
        return len(self._failures)
