"""The per-device execution rules (firmware_ota.executions), without a server."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from firmware_ota.executions import (
    MAX_RETRY_BACKOFF,
    Action,
    ExecutionState,
    FirmwareReport,
    Outcome,
    after_failure,
    finished_job_patch,
    is_overdue,
    job_document,
    judge_report,
    read_report,
)
from twin.merge_patch import apply_merge_patch

SHA = "ab" * 32
OTHER = "cd" * 32
S = ExecutionState
NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def report(**members: object) -> FirmwareReport:
    return read_report({"firmware": {"job": SHA, **members}})


@pytest.mark.parametrize(
    ("state", "action", "seen", "expected"),
    [
        # Running the target version after the reboot is success, whatever came before.
        (
            S.INSTALLING,
            Action.INSTALL,
            report(version="2.0.0", state="idle"),
            Outcome(S.SUCCEEDED, 100),
        ),
        (
            S.DOWNLOADING,
            Action.INSTALL,
            report(version="2.0.0", result="success"),
            Outcome(S.SUCCEEDED, 100),
        ),
        # Progress.
        (
            S.DOWNLOADING,
            Action.INSTALL,
            report(state="downloading", progress=40),
            Outcome(S.DOWNLOADING, 40),
        ),
        (S.DOWNLOADING, Action.DOWNLOAD, report(state="downloaded"), Outcome(S.DOWNLOADED, 100)),
        (S.DOWNLOADING, Action.INSTALL, report(state="downloaded"), Outcome(S.INSTALLING, 100)),
        (S.DOWNLOADED, Action.INSTALL, report(state="updating"), Outcome(S.INSTALLING, 100)),
        # Failures, with the device's reason; a fallback to the old version is "reverted".
        (
            S.DOWNLOADING,
            Action.INSTALL,
            report(state="idle", result="failed", reason="integrity", detail="bad digest"),
            Outcome(S.FAILED, reason="integrity", detail="bad digest"),
        ),
        (
            S.INSTALLING,
            Action.INSTALL,
            report(version="1.0.0", state="idle", result="success"),
            Outcome(S.FAILED, reason="reverted", detail="device runs 1.0.0 after the update"),
        ),
        (
            S.INSTALLING,
            Action.INSTALL,
            report(state="idle", result="failed"),
            Outcome(S.FAILED, reason="install_error"),
        ),
    ],
)
def test_reports_move_an_execution(
    state: ExecutionState, action: Action, seen: FirmwareReport, expected: Outcome
) -> None:
    assert judge_report(state, action, SHA, "2.0.0", seen) == expected


def test_reports_that_change_nothing() -> None:
    # Old news about another job, a repeated state, and executions not holding a job.
    other_job = read_report({"firmware": {"job": OTHER, "state": "idle", "result": "failed"}})
    assert judge_report(S.DOWNLOADING, Action.INSTALL, SHA, "2.0.0", other_job) is None
    assert (
        judge_report(S.DOWNLOADING, Action.INSTALL, SHA, "2.0.0", report(state="downloading"))
        is None
    )
    for state in (S.PENDING, S.RETRY_WAIT, S.SUCCEEDED, S.FAILED, S.SKIPPED):
        assert judge_report(state, Action.INSTALL, SHA, "2.0.0", report(version="2.0.0")) is None


def test_reports_are_read_leniently() -> None:
    assert read_report({}) == FirmwareReport()
    assert read_report({"firmware": "2.0"}) == FirmwareReport()
    odd = read_report({"firmware": {"version": 2, "progress": True, "detail": "x" * 999}})
    assert odd.version == "" and odd.progress is None and len(odd.detail) == 256


def test_transient_failures_are_retried_with_doubling_backoff_then_final() -> None:
    base = timedelta(seconds=30)
    first = after_failure("connection_lost", 1, 3, NOW, base)
    second = after_failure("timeout", 2, 3, NOW, base)
    assert (first.state, first.retry_at) == (S.RETRY_WAIT, NOW + base)
    assert (second.state, second.retry_at) == (S.RETRY_WAIT, NOW + 2 * base)
    assert after_failure("timeout", 3, 3, NOW, base).state is S.TIMED_OUT
    assert after_failure("connection_lost", 3, 3, NOW, base).state is S.FAILED
    capped = after_failure("timeout", 19, 20, NOW, base)
    assert capped.retry_at == NOW + MAX_RETRY_BACKOFF
    for permanent in ("integrity", "unsupported", "rejected", "install_error", "reverted"):
        assert after_failure(permanent, 1, 5, NOW, base) == after_failure(
            permanent, 1, 5, NOW, base
        )
        assert after_failure(permanent, 1, 5, NOW, base).state is S.FAILED


def test_only_devices_holding_an_unanswered_instruction_are_overdue() -> None:
    timeout = timedelta(minutes=10)
    long_ago = NOW - timedelta(minutes=11)
    assert is_overdue(S.DOWNLOADING, long_ago, NOW, timeout)
    assert is_overdue(S.INSTALLING, long_ago, NOW, timeout)
    assert not is_overdue(S.DOWNLOADING, NOW - timedelta(minutes=9), NOW, timeout)
    # Waiting for the install window is the campaign's wait, not the device's.
    assert not is_overdue(S.DOWNLOADED, long_ago, NOW, timeout)
    assert not is_overdue(S.RETRY_WAIT, long_ago, NOW, timeout)


def test_a_finished_job_leaves_only_the_version_or_nothing() -> None:
    job = job_document(
        version="2.0.0",
        sha256=SHA,
        size=10,
        uri=f"/fw/{SHA}",
        signature="",
        manifest="m",
        action=Action.INSTALL,
        attempt=1,
    )
    desired = {"power": True, "firmware": job}
    assert apply_merge_patch(desired, finished_job_patch("2.0.0")) == {
        "power": True,
        "firmware": {"version": "2.0.0"},
    }
    assert apply_merge_patch(desired, finished_job_patch(None)) == {"power": True}
