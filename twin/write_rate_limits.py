"""How often one device may write (report, send telemetry, say it is alive): a token bucket
per device. Pure logic; the clock is passed in.

A device gets `burst` writes at once and `per_minute` more every minute, so a lamp that
reports every minute, or a sensor catching up after a night offline, never notices; a device
stuck in a loop (or a stolen certificate) gets 4.29 Too Many Requests with the seconds until
its next write in Max-Age, instead of filling the database and the report queue for everyone.

The buckets are in memory, per replica (a device holds one connection, so it talks to one
replica at a time), and bounded: the least recently refilled buckets are forgotten first,
which only ever gives a device a fresh, full bucket.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass
class WriteRateLimiter:
    """Token buckets by device id. `per_minute` 0 turns the limit off."""

    per_minute: float
    burst: int
    max_devices: int = 200_000
    # device id -> (tokens left, when they were counted)
    _buckets: OrderedDict[str, tuple[float, float]] = field(default_factory=OrderedDict)

    def __post_init__(self) -> None:
        if self.per_minute < 0:
            raise ValueError(f"per_minute must not be negative, not {self.per_minute}")
        if self.burst < 1:
            raise ValueError(f"burst must be at least 1, not {self.burst}")

    def take(self, device_id: str, now: float) -> int:
        """Take one write for `device_id` at `now` (seconds, monotonic): 0 if it may write,
        otherwise the whole seconds (at least 1) until it may, and nothing is taken."""
        if self.per_minute == 0:
            return 0
        per_second = self.per_minute / 60
        tokens, counted = self._buckets.pop(device_id, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - counted) * per_second)
        if tokens >= 1:
            tokens -= 1
            wait = 0
        else:
            wait = max(1, math.ceil((1 - tokens) / per_second))
        self._buckets[device_id] = (tokens, now)
        while len(self._buckets) > self.max_devices:
            self._buckets.popitem(last=False)
        return wait

    def __len__(self) -> int:
        return len(self._buckets)
