"""Failure throttling: window arithmetic, Max-Age values and bounded memory."""

from __future__ import annotations

from provisioning.rate_limits import FailureLimiter


def test_a_key_may_fail_up_to_the_limit_then_waits() -> None:
    limiter = FailureLimiter(max_failures=3, window_seconds=60)
    for t in (0.0, 1.0, 2.0):
        assert limiter.retry_after("10.0.0.1", t) == 0
        limiter.record_failure("10.0.0.1", t)
    # The first failure (t=0) leaves the window at t=60.
    assert limiter.retry_after("10.0.0.1", 2.5) == 58
    assert limiter.retry_after("10.0.0.1", 59.5) == 1
    assert limiter.retry_after("10.0.0.1", 60.0) == 0


def test_keys_are_independent() -> None:
    limiter = FailureLimiter(max_failures=1, window_seconds=10)
    limiter.record_failure("serial:A", 0)
    assert limiter.retry_after("serial:A", 1) == 9
    assert limiter.retry_after("serial:B", 1) == 0


def test_old_failures_age_out_and_are_dropped() -> None:
    limiter = FailureLimiter(max_failures=2, window_seconds=10)
    limiter.record_failure("k", 0)
    limiter.record_failure("k", 5)
    assert limiter.retry_after("k", 6) == 4
    # After t=10 only the failure at 5 counts: one more is allowed.
    assert limiter.retry_after("k", 11) == 0
    limiter.record_failure("k", 11)
    assert limiter.retry_after("k", 12) == 3
    assert limiter.retry_after("k", 100) == 0
    assert len(limiter) == 0


def test_the_number_of_tracked_keys_is_bounded() -> None:
    limiter = FailureLimiter(max_failures=1, window_seconds=100, max_keys=3)
    for i in range(10):
        limiter.record_failure(f"k{i}", float(i))
    assert len(limiter) == 3
    assert limiter.retry_after("k9", 10) > 0
    assert limiter.retry_after("k0", 10) == 0
