"""Waves of a rollout campaign: their extents, which device falls in which, and when a wave
has passed or failed.

A campaign offers its update to its target (the devices its selector matched when it started)
in a random order fixed at the start, wave by wave. Each wave's extent is cumulative: either a
percentage of the target or a number of devices. "1%,10%,50%,100%" (`DEFAULT_WAVES`) offers
the update to 1% of the devices, then to 10% in total, 50%, and finally all; "10,100,100%"
to 10 devices, then 100 in total, then all. The last wave must be 100%, and extents of the
same kind must grow strictly (a count and a percentage are not comparable until the target
is known; `wave_targets` then keeps them in order).

Order (`rank`, `shuffled`): a device's place is the SHA-256 of the campaign's seed and its id.
It depends on nothing else, so it is the same after a restart, and adding or removing other
devices does not move it; another seed gives an unrelated order. The driver stores the
positions (0-based) in that order; devices that join a continuous campaign later take the
next positions and belong to the last wave (`wave_of`).

Sizes (`wave_targets`): a percentage is rounded up to whole devices (1% of 30 is 1 device),
percentages being taken to 1/1000 of a percent. Whenever the target has at least as many
devices as there are waves, every wave gets at least one device, so no wave's gate (its
thresholds and approval) is silently skipped: a wave is moved up behind its predecessor,
or down to leave one device for each later wave. With fewer devices, the first waves get
one device each until all are placed.

Judging a wave (`judge_wave`), from its counts (`WaveCounts`). Skipped devices (refused as a
downgrade, incompatible, already up to date) finish without counting either way, so the
wave's size for judging is `eligible = assigned - skipped`; `finished = succeeded + failed +
timed_out`. Nothing is judged before `min(min_finished, eligible)` devices have finished,
so one early failure cannot stop a large wave, yet a small wave is still judged. Then:

1. failure: (failed + timed_out) / finished > failure_threshold gives the wave's `on_failure`
   verdict (PAUSE, ABORT or ROLLBACK). It is judged while devices are still running, so a bad
   wave stops early: the driver starts no further device;
2. success: succeeded / eligible >= success_threshold gives ADVANCE, or AWAIT_APPROVAL when
   the wave requires approval before the next one. The next wave may start while the rest of
   this one still runs. On the last wave success gives COMPLETE, but only once every device
   has finished (until then a late run of failures can still stop it);
3. when every device has finished and neither threshold decided, PAUSE: an operator must look;
4. otherwise WAIT.

A wave with no eligible device passes. If it had no device at all (an empty target, or the
target used up by earlier waves) it skips its approval too, as there is nothing to inspect;
a wave whose devices were all skipped still waits for its approval. An empty target thus
passes straight through its waves to COMPLETE.

Everything here is pure; the durable driver calls it.
"""

from __future__ import annotations

import bisect
import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from enum import StrEnum
from typing import cast

from twin.errors import InvalidArgument

__all__ = [
    "DEFAULT_FAILURE_THRESHOLD",
    "DEFAULT_MIN_FINISHED",
    "DEFAULT_SUCCESS_THRESHOLD",
    "DEFAULT_WAVES",
    "MAX_WAVES",
    "MAX_WAVES_TEXT_LENGTH",
    "MIN_PERCENT",
    "FailureAction",
    "Verdict",
    "WaveCounts",
    "WaveSpec",
    "check_waves",
    "explain_wave",
    "judge_wave",
    "parse_waves",
    "rank",
    "shuffled",
    "wave_of",
    "wave_targets",
]

MAX_WAVES = 20
MAX_WAVES_TEXT_LENGTH = 512
DEFAULT_SUCCESS_THRESHOLD = 0.95
DEFAULT_FAILURE_THRESHOLD = 0.10
DEFAULT_MIN_FINISHED = 5
_FULL_PERCENT = 100.0
# Percentages count in thousandths of a percent: 0.001% of a 100,000-lamp fleet is one lamp.
_STEPS_PER_PERCENT = 1000
MIN_PERCENT = 1 / _STEPS_PER_PERCENT
_FULL_STEPS = round(_FULL_PERCENT * _STEPS_PER_PERCENT)

# [0-9] rather than \d, which also matches non-ASCII digits.
_PERCENT_ITEM = re.compile(r"([0-9]{1,3}(?:\.[0-9]{1,3})?)\s*%")
_COUNT_ITEM = re.compile(r"[0-9]{1,9}")
_ITEM_RULE = 'must be a percentage such as "10%" or "0.5%", or a device count such as "100"'


class FailureAction(StrEnum):
    """What a failing wave does to its campaign."""

    PAUSE = "pause"
    ABORT = "abort"
    ROLLBACK = "rollback"


class Verdict(StrEnum):
    """What the driver does after judging a wave (see the module docstring)."""

    WAIT = "wait"
    ADVANCE = "advance"
    AWAIT_APPROVAL = "await_approval"
    COMPLETE = "complete"
    PAUSE = "pause"
    ABORT = "abort"
    ROLLBACK = "rollback"


@dataclass(frozen=True, slots=True)
class WaveSpec:
    """One wave: its cumulative extent and how it is judged.

    Set exactly one of `percent` (of the campaign's target, 0.001..100) and `device_count`
    (>= 1). `approval_required` holds the campaign after this wave until an operator approves
    the next one. `check_waves` enforces the rules; the constructor does not.
    """

    percent: float | None = None
    device_count: int | None = None
    success_threshold: float = DEFAULT_SUCCESS_THRESHOLD
    failure_threshold: float = DEFAULT_FAILURE_THRESHOLD
    min_finished: int = DEFAULT_MIN_FINISHED
    on_failure: FailureAction = FailureAction.PAUSE
    approval_required: bool = False

    def __str__(self) -> str:
        if self.percent is not None:
            return f"{self.percent:g}%"
        return str(self.device_count)


DEFAULT_WAVES: tuple[WaveSpec, ...] = (
    WaveSpec(percent=1.0),
    WaveSpec(percent=10.0),
    WaveSpec(percent=50.0),
    WaveSpec(percent=_FULL_PERCENT),
)


@dataclass(frozen=True, slots=True)
class WaveCounts:
    """The devices of one wave by the state of their update.

    Every device is in exactly one state, so the parts add up to `assigned` (ValueError
    otherwise: that is a bug in the caller's counting). Executions cancelled by an abort are
    not judged and have no place here.
    """

    assigned: int
    pending: int = 0
    in_progress: int = 0
    succeeded: int = 0
    failed: int = 0
    timed_out: int = 0
    skipped: int = 0

    def __post_init__(self) -> None:
        for item in fields(self):
            if getattr(self, item.name) < 0:
                raise ValueError(f"WaveCounts.{item.name} is negative")
        parts = (
            self.pending
            + self.in_progress
            + self.succeeded
            + self.failed
            + self.timed_out
            + self.skipped
        )
        if parts != self.assigned:
            raise ValueError(f"WaveCounts: the states add up to {parts}, not {self.assigned}")

    @property
    def finished(self) -> int:
        """Devices whose update ended and counts: succeeded, failed or timed out."""
        return self.succeeded + self.failed + self.timed_out

    @property
    def eligible(self) -> int:
        """Devices the wave is judged on: all but the skipped ones."""
        return self.assigned - self.skipped


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _steps(percent: float) -> int:
    """A percentage in thousandths of a percent, the precision wave sizes are computed in."""
    return round(percent * _STEPS_PER_PERCENT)


def _check_wave(index: int, wave: WaveSpec) -> None:
    where = f"waves[{index}]"
    if (wave.percent is None) == (wave.device_count is None):
        raise InvalidArgument(f"{where}: set exactly one of percent and device_count")
    # Written so that NaN fails every range check.
    if wave.percent is not None and not MIN_PERCENT <= wave.percent <= _FULL_PERCENT:
        raise InvalidArgument(
            f"{where}.percent: must be {MIN_PERCENT}..{_FULL_PERCENT:g}, got {wave.percent}"
        )
    if wave.device_count is not None and not (
        _is_count(wave.device_count) and wave.device_count >= 1
    ):
        raise InvalidArgument(
            f"{where}.device_count: must be an integer >= 1, got {wave.device_count!r}"
        )
    for name in ("success_threshold", "failure_threshold"):
        value = getattr(wave, name)
        if not 0 <= value <= 1:
            raise InvalidArgument(f"{where}.{name}: must be a fraction 0..1, got {value}")
    if not (_is_count(wave.min_finished) and wave.min_finished >= 1):
        raise InvalidArgument(
            f"{where}.min_finished: must be an integer >= 1, got {wave.min_finished!r}"
        )
    try:
        FailureAction(wave.on_failure)
    except ValueError:
        actions = ", ".join(action.value for action in FailureAction)
        raise InvalidArgument(
            f"{where}.on_failure: must be one of {actions}, got {wave.on_failure!r}"
        ) from None


def check_waves(waves: Sequence[WaveSpec]) -> None:
    """Raise InvalidArgument, naming the wave and field, unless `waves` is a valid plan.

    A plan has 1..`MAX_WAVES` waves, each valid on its own (one extent, in range; thresholds
    fractions in 0..1; `min_finished` >= 1; a known `on_failure`); percentages grow strictly
    from wave to wave, and so do device counts; the last wave is 100%.
    """
    if not waves:
        raise InvalidArgument("waves: at least one wave is needed")
    if len(waves) > MAX_WAVES:
        raise InvalidArgument(f"waves: at most {MAX_WAVES} waves, got {len(waves)}")
    last_steps: int | None = None
    last_count: int | None = None
    for index, wave in enumerate(waves):
        _check_wave(index, wave)
        if wave.percent is not None:
            steps = _steps(wave.percent)
            if last_steps is not None and steps <= last_steps:
                raise InvalidArgument(
                    f"waves[{index}].percent: {wave} does not grow past an earlier "
                    f"{last_steps / _STEPS_PER_PERCENT:g}% (extents are cumulative)"
                )
            last_steps = steps
        elif wave.device_count is not None:
            if last_count is not None and wave.device_count <= last_count:
                raise InvalidArgument(
                    f"waves[{index}].device_count: {wave} does not grow past an earlier "
                    f"{last_count} (extents are cumulative)"
                )
            last_count = wave.device_count
    if last_steps != _FULL_STEPS or waves[-1].percent is None:
        raise InvalidArgument(
            f"waves[{len(waves) - 1}]: the last wave must be 100%, got {waves[-1]}"
        )


def parse_waves(text: str) -> tuple[WaveSpec, ...]:
    """Read a comma-separated wave plan such as "1%,10%,50%,100%" or "10,100,100%".

    Each item is a cumulative percentage (up to three decimals, "0.5%") or device count;
    whitespace around items is ignored. The waves get the default thresholds, `on_failure`
    and no approval (`dataclasses.replace` changes them). Raises InvalidArgument quoting the
    offending item, or as `check_waves` does.
    """
    if len(text) > MAX_WAVES_TEXT_LENGTH:
        raise InvalidArgument(f"waves: longer than {MAX_WAVES_TEXT_LENGTH} characters")
    if not text.strip():
        raise InvalidArgument("waves: at least one wave is needed")
    waves: list[WaveSpec] = []
    for index, raw in enumerate(text.split(",")):
        item = raw.strip()
        percent = _PERCENT_ITEM.fullmatch(item)
        if percent is not None:
            waves.append(WaveSpec(percent=float(percent[1])))
        elif _COUNT_ITEM.fullmatch(item):
            waves.append(WaveSpec(device_count=int(item)))
        else:
            raise InvalidArgument(f"waves[{index}]: {item!r} {_ITEM_RULE}")
    result = tuple(waves)
    check_waves(result)
    return result


def wave_targets(total: int, waves: Sequence[WaveSpec]) -> list[int]:
    """The cumulative number of devices offered the update after each wave.

    For a target of `total` devices: non-decreasing, capped at `total`, the last equal to
    `total`; each at least 1 when `total` > 0, and strictly increasing when `total` >=
    len(waves) (see the module docstring). Raises InvalidArgument as `check_waves` does, and
    ValueError for a negative `total`.
    """
    if total < 0:
        raise ValueError(f"total: must be >= 0, got {total}")
    check_waves(waves)
    targets: list[int] = []
    previous = 0
    for index, wave in enumerate(waves):
        if wave.percent is not None:
            wanted = -(-total * _steps(wave.percent) // _FULL_STEPS)  # rounded up
        else:
            # check_waves made sure that a wave without a percentage has a device count.
            wanted = cast(int, wave.device_count)
        later_waves = len(waves) - 1 - index
        lowest = min(previous + 1, total)
        highest = max(lowest, total - later_waves)
        previous = min(max(wanted, lowest), highest)
        targets.append(previous)
    return targets


def wave_of(position: int, targets: Sequence[int]) -> int:
    """The 0-based wave of the device at 0-based `position` in the campaign's order.

    `targets` are the cumulative counts from `wave_targets`. Positions past the last target
    (devices that joined a continuous campaign after it started) belong to the last wave.
    Raises ValueError for a negative position or no targets.
    """
    if position < 0:
        raise ValueError(f"position: must be >= 0, got {position}")
    if not targets:
        raise ValueError("targets: empty")
    return min(bisect.bisect_right(targets, position), len(targets) - 1)


def rank(campaign_seed: str, device_id: str) -> bytes:
    """The sort key of a device in a campaign's random order (32 bytes, SHA-256).

    The seed's length goes first so that no other (seed, id) pair hashes the same text.
    """
    seed = campaign_seed.encode()
    material = len(seed).to_bytes(8, "big") + seed + device_id.encode()
    return hashlib.sha256(material).digest()


def shuffled(ids: Iterable[str], seed: str) -> list[str]:
    """`ids` in the campaign's random order for `seed`: sorted by `rank`, then by id.

    The same ids and seed always give the same order (a fresh campaign should take a fresh
    random seed, e.g. `secrets.token_hex(16)`, and store it).
    """
    return sorted(ids, key=lambda device_id: (rank(seed, device_id), device_id))


def _percent(fraction: float) -> str:
    return f"{100 * fraction:.4g}%"


def _passed(spec: WaveSpec, is_last: bool, approve: bool) -> Verdict:
    if is_last:
        return Verdict.COMPLETE
    if approve and spec.approval_required:
        return Verdict.AWAIT_APPROVAL
    return Verdict.ADVANCE


def _judge(spec: WaveSpec, counts: WaveCounts, is_last: bool) -> tuple[Verdict, str]:
    eligible = counts.eligible
    if eligible == 0:
        if counts.assigned == 0:
            return _passed(spec, is_last, approve=False), "the wave has no devices"
        return _passed(spec, is_last, approve=True), f"all {counts.assigned} devices skipped"
    finished = counts.finished
    needed = min(spec.min_finished, eligible)
    if finished < needed:
        return Verdict.WAIT, f"{finished} devices finished, {needed} needed to judge the wave"
    failures = counts.failed + counts.timed_out
    failure_rate = failures / finished
    if failure_rate > spec.failure_threshold:
        return Verdict(spec.on_failure), (
            f"{failures} of {finished} finished devices failed or timed out "
            f"({_percent(failure_rate)} > {_percent(spec.failure_threshold)})"
        )
    success_rate = counts.succeeded / eligible
    running = counts.pending + counts.in_progress
    summary = (
        f"{counts.succeeded} of {eligible} devices succeeded ({_percent(success_rate)}"
        f" {'>=' if success_rate >= spec.success_threshold else '<'}"
        f" {_percent(spec.success_threshold)})"
    )
    if success_rate >= spec.success_threshold:
        if is_last and running:
            return Verdict.WAIT, f"{summary}; {running} still to finish"
        return _passed(spec, is_last, approve=True), summary
    if not running:
        return Verdict.PAUSE, f"every device finished but only {summary}; an operator must decide"
    return Verdict.WAIT, f"{summary}; {running} still to finish"


def judge_wave(spec: WaveSpec, counts: WaveCounts, is_last: bool) -> Verdict:
    """What the driver does about a wave with these counts (rules in the module docstring).

    WAIT: keep going (start more of the wave's devices as the limits allow) and judge again
    when counts change. ADVANCE: start the next wave. AWAIT_APPROVAL: hold until an operator
    approves the next wave. COMPLETE: the campaign is done. PAUSE, ABORT, ROLLBACK: start no
    further device and act. `explain_wave` says why, for the campaign's state reason.
    """
    return _judge(spec, counts, is_last)[0]


def explain_wave(spec: WaveSpec, counts: WaveCounts, is_last: bool) -> str:
    """Why `judge_wave` decides as it does, for operators, e.g. "3 of 10 finished devices
    failed or timed out (30% > 10%)"."""
    return _judge(spec, counts, is_last)[1]
