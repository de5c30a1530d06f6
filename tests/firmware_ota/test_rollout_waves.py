"""Rollout waves: plans, sizes, the random order, and judging a wave."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import replace
from itertools import pairwise

import pytest

from firmware_ota.rollout_waves import (
    DEFAULT_WAVES,
    MAX_WAVES,
    FailureAction,
    Verdict,
    WaveCounts,
    WaveSpec,
    check_waves,
    explain_wave,
    judge_wave,
    parse_waves,
    rank,
    shuffled,
    wave_of,
    wave_targets,
)
from twin.errors import InvalidArgument

P = WaveSpec


def C(n: int) -> WaveSpec:
    return WaveSpec(device_count=n)


def pct(p: float) -> WaveSpec:
    return WaveSpec(percent=p)


# --- plans -------------------------------------------------------------------------------------


def test_default_waves() -> None:
    assert [w.percent for w in DEFAULT_WAVES] == [1, 10, 50, 100]
    check_waves(DEFAULT_WAVES)
    assert parse_waves("1%,10%,50%,100%") == DEFAULT_WAVES
    wave = DEFAULT_WAVES[0]
    assert (wave.success_threshold, wave.failure_threshold, wave.min_finished) == (0.95, 0.1, 5)
    assert wave.on_failure is FailureAction.PAUSE
    assert not wave.approval_required


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("100%", (pct(100),)),
        ("10,100,100%", (C(10), C(100), pct(100))),
        (" 0.5% , 10 ,100 % ", (pct(0.5), C(10), pct(100))),
        ("0.001%,100.000%", (pct(0.001), pct(100))),
        ("1000,1%,100%", (C(1000), pct(1), pct(100))),
    ],
)
def test_parse_waves(text: str, expected: tuple[WaveSpec, ...]) -> None:
    assert parse_waves(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "at least one wave"),
        ("  ", "at least one wave"),
        ("10%,,100%", r"waves\[1\]: '' must be a percentage"),
        ("ten%", r"waves\[0\]: 'ten%'"),
        ("-1,100%", r"waves\[0\]: '-1'"),
        ("1.5,100%", r"waves\[0\]: '1.5'"),
        ("0.0001%,100%", r"waves\[0\]: '0.0001%'"),
        ("1e3,100%", r"waves\[0\]: '1e3'"),
        ("0%,100%", r"waves\[0\]\.percent: must be 0\.001\.\.100"),
        ("101%", r"waves\[0\]\.percent"),
        ("0,100%", r"waves\[0\]\.device_count: must be an integer >= 1"),
        ("10%,5%,100%", r"waves\[1\]\.percent: 5% does not grow past an earlier 10%"),
        ("10%,10%,100%", r"waves\[1\]\.percent"),
        ("100,10%,50,100%", r"waves\[2\]\.device_count: 50 does not grow past an earlier 100"),
        ("10%,50%", r"waves\[1\]: the last wave must be 100%, got 50%"),
        ("10,100", r"waves\[1\]: the last wave must be 100%, got 100"),
        ("100%,200", r"waves\[1\]: the last wave must be 100%"),
        (",".join(["1"] * 600), "longer than"),
    ],
)
def test_parse_waves_rejects(text: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        parse_waves(text)


def test_check_waves_limits_the_number() -> None:
    waves = [C(n) for n in range(1, MAX_WAVES)] + [pct(100)]
    check_waves(waves)
    with pytest.raises(InvalidArgument, match=f"at most {MAX_WAVES} waves"):
        check_waves([C(n) for n in range(1, MAX_WAVES + 1)] + [pct(100)])


@pytest.mark.parametrize(
    ("wave", "message"),
    [
        (WaveSpec(), ": set exactly one of percent and device_count"),
        (WaveSpec(percent=100, device_count=5), ": set exactly one"),
        (pct(float("nan")), r"\.percent"),
        (replace(pct(100), success_threshold=1.01), r"\.success_threshold: must be a fraction"),
        (replace(pct(100), success_threshold=-0.1), r"\.success_threshold"),
        (replace(pct(100), failure_threshold=float("nan")), r"\.failure_threshold"),
        (replace(pct(100), failure_threshold=2), r"\.failure_threshold"),
        (replace(pct(100), min_finished=0), r"\.min_finished: must be an integer >= 1"),
        (replace(pct(100), on_failure="explode"), r"\.on_failure: must be one of pause"),  # type: ignore[arg-type]
    ],
)
def test_check_waves_rejects_a_bad_wave(wave: WaveSpec, message: str) -> None:
    with pytest.raises(InvalidArgument, match=r"^waves\[0\]" + message):
        check_waves([wave])


def test_check_waves_takes_thresholds_at_the_edges() -> None:
    check_waves([replace(pct(100), success_threshold=0, failure_threshold=1, min_finished=1)])
    check_waves([replace(pct(100), success_threshold=1, failure_threshold=0)])
    # A stored plan may spell the action as its string.
    check_waves([replace(pct(100), on_failure="rollback")])  # type: ignore[arg-type]


# --- sizes -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("total", "text", "expected"),
    [
        (100_000, "1%,10%,50%,100%", [1_000, 10_000, 50_000, 100_000]),
        (30, "1%,100%", [1, 30]),  # 1% of 30 rounds up to one device
        (1000, "0.1%,100%", [1, 1000]),
        (1000, "1.1%,100%", [11, 1000]),  # not 12: no float error in the rounding
        (101, "1%,100%", [2, 101]),
        (100_000, "10,100,100%", [10, 100, 100_000]),
        (50, "10,100,100%", [10, 49, 50]),  # leaves a device for the last wave
        (5, "10,100,100%", [3, 4, 5]),
        (4, "1%,10%,50%,100%", [1, 2, 3, 4]),  # every wave non-empty
        (2, "1%,10%,50%,100%", [1, 2, 2, 2]),
        (1, "1%,10%,50%,100%", [1, 1, 1, 1]),
        (0, "1%,10%,50%,100%", [0, 0, 0, 0]),
        (500, "10,1%,100%", [10, 11, 500]),  # 1% of 500 is 5, behind the 10 before it
        (7, "100%", [7]),
    ],
)
def test_wave_targets(total: int, text: str, expected: list[int]) -> None:
    assert wave_targets(total, parse_waves(text)) == expected


def test_wave_targets_rejects_a_negative_total_and_a_bad_plan() -> None:
    with pytest.raises(ValueError, match="total"):
        wave_targets(-1, DEFAULT_WAVES)
    with pytest.raises(InvalidArgument, match="last wave"):
        wave_targets(10, [pct(50)])


def _random_plan(rng: random.Random) -> list[WaveSpec]:
    waves: list[WaveSpec] = []
    percent, count = 0.0, 0
    for _ in range(rng.randint(0, MAX_WAVES - 1)):
        if rng.random() < 0.5:
            percent = round(percent + rng.uniform(0.001, 10), 3)
            if percent >= 100:
                break
            waves.append(pct(percent))
        else:
            count += rng.randint(1, 500)
            waves.append(C(count))
    waves.append(pct(100))
    return waves


def test_wave_targets_properties() -> None:
    rng = random.Random(2024)
    for _ in range(2000):
        waves = _random_plan(rng)
        total = rng.choice([0, 1, 2, 3, rng.randint(0, 50), rng.randint(0, 200_000)])
        targets = wave_targets(total, waves)
        assert len(targets) == len(waves)
        assert targets[-1] == total
        assert all(0 <= t <= total for t in targets)
        assert all(a <= b for a, b in pairwise(targets))
        if total > 0:
            assert targets[0] >= 1
        if total >= len(waves):
            assert all(a < b for a, b in pairwise([0, *targets])), (total, waves, targets)


def test_wave_of() -> None:
    targets = [1, 10, 50, 100]
    assert [wave_of(p, targets) for p in (0, 1, 9, 10, 49, 50, 99)] == [0, 1, 1, 2, 2, 3, 3]
    # Devices that joined a continuous campaign later belong to the last wave.
    assert wave_of(100, targets) == 3
    assert wave_of(10_000, targets) == 3
    # Empty waves get no device.
    assert [wave_of(p, [1, 2, 2, 2]) for p in range(4)] == [0, 1, 3, 3]
    assert wave_of(0, [0, 0, 0]) == 2
    with pytest.raises(ValueError, match="position"):
        wave_of(-1, targets)
    with pytest.raises(ValueError, match="targets"):
        wave_of(0, [])


def test_wave_of_matches_targets() -> None:
    rng = random.Random(5)
    for _ in range(200):
        waves = _random_plan(rng)
        total = rng.randint(0, 3000)
        targets = wave_targets(total, waves)
        sizes = Counter(wave_of(position, targets) for position in range(total))
        assert [sizes[i] for i in range(len(waves))] == [b - a for a, b in pairwise([0, *targets])]


# --- order -------------------------------------------------------------------------------------


def test_rank_is_sha256_of_the_seed_and_id() -> None:
    assert len(rank("seed", "lamp-1")) == 32
    assert rank("seed", "lamp-1") == rank("seed", "lamp-1")
    assert rank("seed", "lamp-1") != rank("seed", "lamp-2")
    assert rank("seed", "lamp-1") != rank("seed2", "lamp-1")
    # The seed's length is part of the hash, so the split between seed and id matters.
    assert rank("ab", "c") != rank("a", "bc")


def test_shuffled_properties() -> None:
    ids = [f"lamp-{n}" for n in range(1000)]
    order = shuffled(ids, "campaign-1")
    assert sorted(order) == sorted(ids)
    assert order != sorted(ids)
    assert shuffled(reversed(ids), "campaign-1") == order  # stable, whatever the input order
    assert shuffled(ids, "campaign-2") != order
    # A device's place relative to the others does not depend on who else is targeted.
    fewer = shuffled(ids[::3], "campaign-1")
    assert fewer == [device for device in order if device in set(ids[::3])]
    # Roughly uniform: each tenth of the ids is spread over the whole order.
    first_half = set(order[:500])
    for start in range(0, 1000, 100):
        assert 25 <= len(first_half & set(ids[start : start + 100])) <= 75


def test_shuffled_keeps_duplicates_and_handles_empty() -> None:
    assert shuffled([], "s") == []
    assert sorted(shuffled(["a", "b", "a"], "s")) == ["a", "a", "b"]


# --- judging -----------------------------------------------------------------------------------

W = WaveSpec(percent=10)  # thresholds 0.95 / 0.10, min_finished 5, PAUSE
APPROVE = replace(W, approval_required=True)
ABORT = replace(W, on_failure=FailureAction.ABORT)
ROLLBACK = replace(W, on_failure=FailureAction.ROLLBACK)
LAST = WaveSpec(percent=100)


def counts(
    pending: int = 0,
    in_progress: int = 0,
    succeeded: int = 0,
    failed: int = 0,
    timed_out: int = 0,
    skipped: int = 0,
) -> WaveCounts:
    total = pending + in_progress + succeeded + failed + timed_out + skipped
    return WaveCounts(total, pending, in_progress, succeeded, failed, timed_out, skipped)


JUDGE_CASES: list[tuple[str, WaveSpec, WaveCounts, bool, Verdict]] = [
    # Nothing judged before min(min_finished, eligible) devices finished.
    ("nothing finished", W, counts(pending=100), False, Verdict.WAIT),
    ("4 of 5 needed", W, counts(pending=90, in_progress=6, failed=4), False, Verdict.WAIT),
    ("small wave", W, counts(in_progress=1, failed=2), False, Verdict.WAIT),
    ("small wave judged", W, counts(succeeded=2, failed=1), False, Verdict.PAUSE),
    # Failure fraction over the finished devices, judged early.
    ("early failure", W, counts(pending=95, succeeded=4, failed=1), False, Verdict.PAUSE),
    ("early timeouts", W, counts(pending=95, succeeded=4, timed_out=1), False, Verdict.PAUSE),
    ("abort", ABORT, counts(pending=95, succeeded=4, failed=1), False, Verdict.ABORT),
    ("rollback", ROLLBACK, counts(pending=95, succeeded=4, failed=1), True, Verdict.ROLLBACK),
    ("at the threshold", W, counts(pending=80, succeeded=18, failed=2), False, Verdict.WAIT),
    ("above it", W, counts(pending=79, succeeded=18, failed=3), False, Verdict.PAUSE),
    ("skips ignored", W, counts(pending=80, succeeded=9, failed=1, skipped=9), False,
     Verdict.WAIT),
    # Success fraction over the eligible devices.
    ("success", W, counts(in_progress=5, succeeded=95), False, Verdict.ADVANCE),
    ("just short", W, counts(in_progress=6, succeeded=94), False, Verdict.WAIT),
    ("skipped excluded", W, counts(in_progress=1, succeeded=19, skipped=80), False,
     Verdict.ADVANCE),
    ("approval", APPROVE, counts(in_progress=5, succeeded=95), False, Verdict.AWAIT_APPROVAL),
    ("last running", LAST, counts(in_progress=5, succeeded=95), True, Verdict.WAIT),
    ("last done", LAST, counts(succeeded=96, failed=4), True, Verdict.COMPLETE),
    ("last, approval moot", replace(LAST, approval_required=True), counts(succeeded=5), True,
     Verdict.COMPLETE),
    # Every device finished but neither threshold decides: an operator must look.
    ("undecided", W, counts(succeeded=92, failed=8), False, Verdict.PAUSE),
    ("undecided last", LAST, counts(succeeded=92, failed=8), True, Verdict.PAUSE),
    # Empty waves pass.
    ("all skipped", W, counts(skipped=10), False, Verdict.ADVANCE),
    ("all skipped, approval", APPROVE, counts(skipped=10), False, Verdict.AWAIT_APPROVAL),
    ("all skipped, last", LAST, counts(skipped=10), True, Verdict.COMPLETE),
    ("no devices", APPROVE, counts(), False, Verdict.ADVANCE),
    ("total 0", LAST, counts(), True, Verdict.COMPLETE),
    # Threshold extremes.
    ("never fails", replace(W, failure_threshold=1), counts(failed=10), False, Verdict.PAUSE),
    ("zero tolerance", replace(W, failure_threshold=0, min_finished=1),
     counts(pending=99, failed=1), False, Verdict.PAUSE),
    ("zero success bar", replace(W, success_threshold=0, min_finished=1),
     counts(pending=99, succeeded=1), False, Verdict.ADVANCE),
]  # fmt: skip


@pytest.mark.parametrize(
    ("spec", "wave_counts", "is_last", "verdict"),
    [case[1:] for case in JUDGE_CASES],
    ids=[case[0] for case in JUDGE_CASES],
)
def test_judge_wave(
    spec: WaveSpec, wave_counts: WaveCounts, is_last: bool, verdict: Verdict
) -> None:
    assert judge_wave(spec, wave_counts, is_last) is verdict
    assert explain_wave(spec, wave_counts, is_last)


def test_explain_wave() -> None:
    assert explain_wave(W, counts(pending=90, succeeded=7, failed=3), False) == (
        "3 of 10 finished devices failed or timed out (30% > 10%)"
    )
    assert explain_wave(W, counts(in_progress=5, succeeded=95), False) == (
        "95 of 100 devices succeeded (95% >= 95%)"
    )
    assert explain_wave(W, counts(pending=97, succeeded=3), False) == (
        "3 devices finished, 5 needed to judge the wave"
    )
    assert "an operator must decide" in explain_wave(W, counts(succeeded=92, failed=8), False)
    assert "94.6%" in explain_wave(W, counts(succeeded=946, failed=54), False)


def test_a_bad_wave_stops_before_it_ends() -> None:
    """Devices finish one by one; a wave that fails often enough is stopped early."""
    size = 1000
    for done in range(1, size + 1):
        failed = done // 4  # a quarter of the devices fail
        verdict = judge_wave(
            W, counts(pending=size - done, succeeded=done - failed, failed=failed), False
        )
        if verdict is not Verdict.WAIT:
            assert verdict is Verdict.PAUSE
            assert done <= W.min_finished
            break
    else:
        pytest.fail("the wave was never stopped")


def test_judge_wave_is_total() -> None:
    """Every combination of small counts gets a verdict, consistent with the rules."""
    for spec in (W, APPROVE, ABORT, LAST):
        for pending in range(3):
            for in_progress in range(3):
                for succeeded in range(8):
                    for failed in range(3):
                        for skipped in range(3):
                            c = counts(pending, in_progress, succeeded, failed, 0, skipped)
                            for is_last in (False, True):
                                verdict = judge_wave(spec, c, is_last)
                                if verdict is Verdict.COMPLETE:
                                    assert is_last
                                    assert pending == in_progress == 0
                                if verdict in (Verdict.ADVANCE, Verdict.AWAIT_APPROVAL):
                                    assert not is_last


@pytest.mark.parametrize(
    "kwargs",
    [
        {"assigned": 3, "pending": 2},
        {"assigned": 1, "pending": 2},
        {"assigned": 0, "pending": -1, "succeeded": 1},
    ],
)
def test_wave_counts_must_add_up(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="WaveCounts"):
        WaveCounts(**kwargs)


def test_wave_counts_derived() -> None:
    c = counts(pending=1, in_progress=2, succeeded=3, failed=4, timed_out=5, skipped=6)
    assert c.assigned == 21
    assert c.finished == 12
    assert c.eligible == 15
