"""One device's update within a campaign: its states, and how reports, timeouts and retries
move it (pure functions; the campaign driver persists what they decide).

    PENDING ──start──► DOWNLOADING ──device has it, install window shut──► DOWNLOADED
                          │  (action "install" written at once when the window is open)   │
                          ▼                                         install window opens ──┘
                       INSTALLING ──device reports the target version──► SUCCEEDED
    any active state ──device reports failed / comes back on another version──► FAILED
                     ──transient failure (connection lost, timeout), attempts left──► RETRY_WAIT
    RETRY_WAIT ──retry time reached──► DOWNLOADING (attempt + 1)
    an active state silent past its deadline, no attempts left ──► TIMED_OUT

Success needs the device to run the target version: a device that reports "success" but runs
another version after its reboot has been reverted by its bootloader, and has failed. Reports
about another job (`firmware.job` names another digest) are old news and ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Final

from twin.merge_patch import Document


class ExecutionState(StrEnum):
    """The state of one device's update (see the module docstring)."""

    PENDING = "pending"
    DOWNLOADING = "downloading"
    DOWNLOADED = "downloaded"
    INSTALLING = "installing"
    RETRY_WAIT = "retry_wait"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"


# The device holds a job in these states: its reports are awaited.
ACTIVE: Final = frozenset(
    {ExecutionState.DOWNLOADING, ExecutionState.DOWNLOADED, ExecutionState.INSTALLING}
)
# Started and not finished: what the concurrency limit counts.
IN_PROGRESS: Final = ACTIVE | {ExecutionState.RETRY_WAIT}
FINISHED: Final = frozenset(
    {
        ExecutionState.SUCCEEDED,
        ExecutionState.FAILED,
        ExecutionState.TIMED_OUT,
        ExecutionState.SKIPPED,
        ExecutionState.CANCELLED,
    }
)


class Action(StrEnum):
    """What the job in the device's desired state asks for."""

    DOWNLOAD = "download"
    INSTALL = "install"


# Failure reasons worth another attempt: the image and the device are fine, the link was not.
TRANSIENT_REASONS: Final = frozenset({"connection_lost", "timeout"})
# Why an execution failed when the device does not say (it came back on another version).
REVERTED: Final = "reverted"
TIMEOUT: Final = "timeout"
MAX_RETRY_BACKOFF: Final = timedelta(hours=1)
_MAX_DETAIL: Final = 256


@dataclass(frozen=True)
class FirmwareReport:
    """The `firmware` object of a device's reported state, read leniently (a device may
    report only some members)."""

    version: str = ""
    job: str = ""
    state: str = ""
    progress: int | None = None
    result: str = ""
    reason: str = ""
    detail: str = ""


def read_report(reported: Document) -> FirmwareReport:
    """The firmware report inside a reported document (empty when there is none)."""
    firmware = reported.get("firmware")
    if not isinstance(firmware, Mapping):
        return FirmwareReport()

    def text(key: str) -> str:
        value = firmware.get(key)
        return value if isinstance(value, str) else ""

    progress = firmware.get("progress")
    return FirmwareReport(
        version=text("version"),
        job=text("job"),
        state=text("state"),
        progress=progress if isinstance(progress, int) and not isinstance(progress, bool) else None,
        result=text("result"),
        reason=text("reason"),
        detail=text("detail")[:_MAX_DETAIL],
    )


@dataclass(frozen=True)
class Outcome:
    """What a report means for an execution: its new state (a failure still to be sorted
    into retry or final by `after_failure`), and what to record."""

    state: ExecutionState
    progress: int | None = None
    reason: str = ""
    detail: str = ""


def judge_report(
    state: ExecutionState,
    action: Action,
    target_sha256: str,
    target_version: str,
    report: FirmwareReport,
) -> Outcome | None:
    """The outcome of `report` for an execution in `state` whose job (with `action`) installs
    `target_version` from `target_sha256`; None when it changes nothing."""
    if state not in ACTIVE:
        return None
    if (
        report.version == target_version
        and report.state in ("", "idle")
        and (report.result != "failed")
    ):
        return Outcome(ExecutionState.SUCCEEDED, progress=100)
    if report.job != target_sha256:
        return None
    if report.result == "failed" and report.state in ("", "idle"):
        return Outcome(
            ExecutionState.FAILED, reason=report.reason or "install_error", detail=report.detail
        )
    if report.state == "idle" and action is Action.INSTALL and report.result:
        # Done with the job, yet not on the target version: the bootloader went back.
        detail = f"device runs {report.version or 'an unknown version'} after the update"
        return Outcome(ExecutionState.FAILED, reason=REVERTED, detail=detail)
    if report.state == "updating" or (report.state == "downloaded" and action is Action.INSTALL):
        return _progressed(state, ExecutionState.INSTALLING, report)
    if report.state == "downloaded":
        return _progressed(state, ExecutionState.DOWNLOADED, report)
    if report.state == "downloading":
        return _progressed(state, state, report)
    return None


def _progressed(
    state: ExecutionState, new: ExecutionState, report: FirmwareReport
) -> Outcome | None:
    progress = (
        100
        if new is not ExecutionState.DOWNLOADING and report.progress is None
        else (report.progress)
    )
    if new is state and progress is None:
        return None
    return Outcome(new, progress=progress)


@dataclass(frozen=True)
class Failure:
    """A failure sorted: final (FAILED or TIMED_OUT), or RETRY_WAIT until `retry_at`."""

    state: ExecutionState
    retry_at: datetime | None = None


def after_failure(
    reason: str,
    attempt: int,
    max_attempts: int,
    now: datetime,
    backoff: timedelta,
) -> Failure:
    """Retry a transient failure while attempts are left, waiting `backoff` doubled for each
    attempt made (capped at an hour); anything else is final."""
    if reason in TRANSIENT_REASONS and attempt < max_attempts:
        wait = min(MAX_RETRY_BACKOFF, backoff * (2 ** max(0, attempt - 1)))
        return Failure(ExecutionState.RETRY_WAIT, retry_at=now + wait)
    if reason == TIMEOUT:
        return Failure(ExecutionState.TIMED_OUT)
    return Failure(ExecutionState.FAILED)


def is_overdue(
    state: ExecutionState, instructed_at: datetime | None, now: datetime, timeout: timedelta
) -> bool:
    """Whether a device has left its job unanswered too long. A downloaded image waiting for
    the install window is not overdue: the wait is the campaign's, not the device's."""
    if state not in (ExecutionState.DOWNLOADING, ExecutionState.INSTALLING):
        return False
    return instructed_at is not None and now - instructed_at > timeout


def job_document(
    *,
    version: str,
    sha256: str,
    size: int,
    uri: str,
    signature: str,
    manifest: str,
    action: Action,
    attempt: int,
) -> Document:
    """The `firmware` object of a device's desired state that asks for a job."""
    return {
        "version": version,
        "sha256": sha256,
        "size": size,
        "uri": uri,
        "signature": signature,
        "manifest": manifest,
        "action": action.value,
        "attempt": attempt,
    }


def finished_job_patch(version: str | None) -> Document:
    """The desired patch that ends a job: on success only the version stays desired (so the
    twin is in sync once the device runs it); otherwise the whole job is withdrawn."""
    if version is None:
        return {"firmware": None}
    return {
        "firmware": {
            "version": version,
            "sha256": None,
            "size": None,
            "uri": None,
            "signature": None,
            "manifest": None,
            "action": None,
            "attempt": None,
        }
    }
