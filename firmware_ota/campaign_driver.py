"""The campaign driver: a loop that reconciles every live campaign, like a controller.

Each pass looks at the whole current state of a campaign (level-triggered, so a missed or
repeated pass is harmless) and moves it on:

1. reads the reports of devices holding a job (executions.judge_report), times out silent
   ones, retries transient failures when their backoff is over, and tells downloaded devices
   to install when their install window opens;
2. judges the current wave (rollout_waves.judge_wave): advance, wait for approval, complete,
   or pause / abort / roll back the campaign;
3. starts pending devices of the waves reached so far, in the campaign's random order, within
   the rate limits and each device's download window; a device that cannot take the image
   (incompatible, downgrade, up to date, decommissioned) is skipped with the reason;
4. for a continuous campaign, adds devices that match its target since.

**One driver per campaign.** A replica drives a campaign only while it holds the campaign's
lease (a conditional UPDATE of `lease_owner`/`lease_until`), and every write a pass makes runs
in a transaction that first re-checks the lease on the locked campaign row (a fence): a replica
that lost its lease while paused (GC, a slow disk) writes nothing. Every execution change is
conditional on the state it was read in and is committed together with the device's desired
state, so a server killed at any moment resumes with nothing done twice and nothing lost.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import secrets
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final
from zoneinfo import ZoneInfo

from tortoise.backends.base.client import BaseDBAsyncClient
from tortoise.expressions import Q
from tortoise.transactions import in_transaction

from firmware_ota import campaign_store
from firmware_ota.artifact_store import ArtifactView, get_artifact
from firmware_ota.campaign_settings import zone_of
from firmware_ota.campaign_store import DRIVER, CampaignState, CampaignView
from firmware_ota.executions import (
    ACTIVE,
    FINISHED,
    IN_PROGRESS,
    TIMEOUT,
    Action,
    ExecutionState,
    FirmwareReport,
    after_failure,
    finished_job_patch,
    is_overdue,
    job_document,
    judge_report,
    read_report,
)
from firmware_ota.maintenance_windows import is_open
from firmware_ota.manifest_signing import ManifestSigner
from firmware_ota.models import Artifact, Campaign, Execution
from firmware_ota.rollout_rates import starts_allowed
from firmware_ota.rollout_waves import Verdict, WaveCounts, explain_wave, judge_wave
from firmware_ota.versions import downgrade_refusal, parse_version, upgrade_path_refusal
from twin.access import Principal, Role
from twin.change_feed import FeedNotifier
from twin.errors import CitytwinError, FailedPrecondition, InvalidArgument, ProfileViolation
from twin.failpoints import failpoint
from twin.merge_patch import Document
from twin.models import Device, Twin
from twin.registry import LifecycleState
from twin.selectors import parse_selector
from twin.twin_store import update_desired

log = logging.getLogger(__name__)

# Starts per pass: bounds one pass's work so the lease is renewed often under a big backlog.
_MAX_STARTS_PER_PASS: Final = 200
_RATE_WINDOW: Final = timedelta(seconds=60)
_TIMEZONE_LABEL: Final = "timezone"
# The driver writes desired state as the service itself.
_SYSTEM = Principal(token_id=0, role=Role.ADMIN, scope=parse_selector(""))


class _LostLease(Exception):
    """Another replica drives this campaign now; this pass stops writing."""


class _Moved(Exception):
    """An execution is no longer in the state this pass read (an operator or a concurrent
    transition changed it); the change is dropped and the next pass looks again."""


@dataclass(frozen=True)
class _DeviceFacts:
    model: str
    kind: str
    state: str
    labels: dict[str, str]
    reported: Document


class CampaignDriver:
    """Drives every live campaign whose lease this replica holds or can take."""

    def __init__(
        self,
        notifier: FeedNotifier,
        signer: ManifestSigner,
        default_zone: ZoneInfo,
        *,
        lease: timedelta,
        join_scan: timedelta,
    ) -> None:
        self._notifier = notifier
        self._lease = lease
        # How often a continuous campaign looks for devices that match it since.
        self._join_scan = join_scan
        self._signer = signer
        self._default_zone = default_zone
        self.replica = secrets.token_hex(8)

    async def run_forever(self, interval: float) -> None:
        """Drive campaigns every `interval` seconds until cancelled."""
        while True:
            try:
                await self.drive_all()
            except Exception:
                log.exception("campaign pass failed")
            await asyncio.sleep(interval)

    async def drive_all(self) -> int:
        """One pass over every live campaign this replica may drive; how many it drove."""
        live: list[int] = (
            await Campaign.filter(
                Q(state__in=[CampaignState.RUNNING.value, CampaignState.PAUSED.value])
                | Q(
                    state=CampaignState.ABORTED.value,
                    executions__state__in=[s.value for s in ACTIVE],
                )
            )
            .distinct()
            .values_list("id", flat=True)  # type: ignore[assignment]
        )
        driven = 0
        for campaign_id in live:
            if not await self._claim(int(campaign_id)):
                continue
            driven += 1
            try:
                await self._drive(int(campaign_id))
            except _LostLease:
                log.info("lost the lease of campaign %s", campaign_id)
        return driven

    async def release_all(self) -> None:
        """Give up this replica's leases (on shutdown) so another takes over at once."""
        await Campaign.filter(lease_owner=self.replica).update(lease_owner="", lease_until=None)

    async def _claim(self, campaign_id: int) -> bool:
        now = datetime.now(UTC)
        taken = await Campaign.filter(
            Q(id=campaign_id)
            & (Q(lease_owner=self.replica) | Q(lease_until__isnull=True) | Q(lease_until__lt=now))
        ).update(lease_owner=self.replica, lease_until=now + self._lease)
        return taken == 1

    async def _fence(self, conn: BaseDBAsyncClient, campaign_id: int) -> Campaign:
        """Lock the campaign row and make sure this replica still holds its lease."""
        row = (
            await Campaign.filter(
                id=campaign_id, lease_owner=self.replica, lease_until__gt=datetime.now(UTC)
            )
            .using_db(conn)
            .select_for_update()
            .first()
        )
        if row is None:
            raise _LostLease(campaign_id)
        return row

    async def _drive(self, campaign_id: int) -> None:
        campaign = await campaign_store.get_campaign(campaign_id)
        artifact = await get_artifact(campaign.artifact_sha256)
        await self._follow_devices(campaign, artifact)
        if campaign.state is not CampaignState.RUNNING:
            return
        campaign = await campaign_store.get_campaign(campaign_id)
        if not await self._judge(campaign):
            return
        campaign = await campaign_store.get_campaign(campaign_id)
        if campaign.state is CampaignState.RUNNING:
            await self._start_devices(campaign, artifact)
            if campaign.continuous:
                await self._add_joiners(campaign_id)

    # --- 1. devices holding a job ------------------------------------------------------

    async def _follow_devices(self, campaign: CampaignView, artifact: ArtifactView) -> None:
        rows = await Execution.filter(
            campaign_id=campaign.id, state__in=[s.value for s in IN_PROGRESS]
        )
        if not rows:
            return
        facts = await _device_facts([r.device_id for r in rows])
        now = datetime.now(UTC)
        for row in rows:
            with contextlib.suppress(_Moved):
                await self._follow(campaign, artifact, row, facts.get(row.device_id), now)

    async def _follow(
        self,
        campaign: CampaignView,
        artifact: ArtifactView,
        row: Execution,
        fact: _DeviceFacts | None,
        now: datetime,
    ) -> None:
        settings = campaign.settings
        state = ExecutionState(row.state)
        if state is ExecutionState.RETRY_WAIT:
            if campaign.state is CampaignState.RUNNING and row.retry_at and row.retry_at <= now:
                await self._give_job(campaign, artifact, row, fact, retry=True)
            return
        if campaign.state is CampaignState.ABORTED and state is not ExecutionState.INSTALLING:
            await self._finish(campaign, row, ExecutionState.CANCELLED, "", "campaign aborted")
            return
        report = read_report(fact.reported) if fact else FirmwareReport()
        outcome = judge_report(
            state,
            Action(row.action or Action.DOWNLOAD),
            artifact.sha256,
            artifact.version,
            report,
        )
        if outcome is not None and outcome.state in (
            ExecutionState.SUCCEEDED,
            ExecutionState.FAILED,
        ):
            await self._conclude(campaign, row, outcome.state, outcome.reason, outcome.detail)
            return
        if outcome is not None:
            await self._progress(campaign.id, row, outcome.state, outcome.progress)
            state = outcome.state
        if is_overdue(state, row.started_at, now, settings.device_timeout):
            await self._conclude(
                campaign,
                row,
                ExecutionState.FAILED,
                TIMEOUT,
                f"no answer within {settings.device_timeout_seconds} s",
            )
        elif (
            state is ExecutionState.DOWNLOADED
            and campaign.state is CampaignState.RUNNING
            and fact is not None
            and is_open(settings.windows("install"), now, self._zone(campaign, fact))
        ):
            await self._give_job(campaign, artifact, row, fact, retry=False)

    async def _progress(
        self, campaign_id: int, row: Execution, state: ExecutionState, progress: int | None
    ) -> None:
        changes: dict[str, Any] = {"state": state.value}
        if progress is not None:
            changes["progress"] = progress
        async with in_transaction() as conn:
            await self._fence(conn, campaign_id)
            await _move(conn, row, **changes)

    async def _conclude(
        self,
        campaign: CampaignView,
        row: Execution,
        state: ExecutionState,
        reason: str,
        detail: str,
    ) -> None:
        """A success, or a failure sorted into retry or final."""
        if state is ExecutionState.SUCCEEDED:
            await self._finish(campaign, row, state, "", "")
            return
        # An aborted campaign tries nothing again; a paused one keeps the retry for its resume.
        attempts = (
            row.attempt
            if campaign.state is CampaignState.ABORTED
            else campaign.settings.max_attempts
        )
        failure = after_failure(
            reason, row.attempt, attempts, datetime.now(UTC), campaign.settings.retry_backoff
        )
        # A job waiting for its retry stays withdrawn, so the device does not keep trying.
        await self._finish(campaign, row, failure.state, reason, detail, retry_at=failure.retry_at)

    async def _finish(
        self,
        campaign: CampaignView,
        row: Execution,
        state: ExecutionState,
        reason: str,
        detail: str,
        *,
        retry_at: datetime | None = None,
    ) -> None:
        """End a job: record the state and withdraw the job from the device's desired
        state (keeping the version desired after a success), in one transaction."""
        now = datetime.now(UTC)
        changes: dict[str, Any] = {
            "state": state.value,
            "reason": reason,
            "detail": detail[:256],
            "retry_at": retry_at,
            "ended_at": now if state in FINISHED else None,
        }
        if state is ExecutionState.SUCCEEDED:
            changes["progress"] = 100
        version = (await _artifact_version(campaign)) if state is ExecutionState.SUCCEEDED else None
        await self._write_job(campaign.id, row, finished_job_patch(version), changes)

    async def _write_job(
        self, campaign_id: int, row: Execution, patch: Document, changes: dict[str, Any]
    ) -> None:
        """Write the device's desired firmware and the execution's new state together."""

        async def also(conn: BaseDBAsyncClient) -> None:
            await self._fence(conn, campaign_id)
            await _move(conn, row, **changes)

        try:
            await update_desired(
                row.device_id,
                patch,
                expected_version=0,
                principal=_SYSTEM,
                notifier=self._notifier,
                also=also,
                firmware_job=True,
            )
        except (FailedPrecondition, ProfileViolation) as unwritable:
            # A decommissioned device, or a model whose profile has no firmware job: record
            # the state without touching the twin.
            async with in_transaction() as conn:
                await self._fence(conn, campaign_id)
                if changes["state"] in (ExecutionState.DOWNLOADING, ExecutionState.INSTALLING):
                    changes = {
                        "state": ExecutionState.SKIPPED.value,
                        "reason": _unwritable_reason(unwritable),
                        "detail": str(unwritable)[:256],
                        "ended_at": datetime.now(UTC),
                    }
                await _move(conn, row, **changes)

    # --- 2. the current wave -------------------------------------------------------------

    async def _judge(self, campaign: CampaignView) -> bool:
        """Judge the current wave; False when the campaign stopped running."""
        settings = campaign.settings
        index = campaign.current_wave
        is_last = index >= len(settings.waves) - 1
        spec = settings.waves[min(index, len(settings.waves) - 1)]
        counts = _wave_counts(campaign.wave_counts.get(index, Counter()))
        verdict = judge_wave(spec, counts, is_last)
        approved = campaign.approved_through >= index
        if approved and verdict is not Verdict.WAIT:
            # An operator resumed this wave: it runs to its end and then moves on.
            verdict = (
                Verdict.WAIT
                if counts.pending + counts.in_progress
                else (Verdict.COMPLETE if is_last else Verdict.ADVANCE)
            )
        if verdict is Verdict.WAIT:
            return True
        why = f"wave {index + 1}: {explain_wave(spec, counts, is_last)}"
        if verdict is Verdict.ADVANCE:
            await self._set_campaign(campaign.id, "wave-passed", why, current_wave=index + 1)
            return True
        if verdict is Verdict.AWAIT_APPROVAL:
            await self._set_campaign(
                campaign.id,
                "awaiting-approval",
                f"{why}; wave {index + 2} waits for approval (resume the campaign)",
                state=CampaignState.PAUSED.value,
            )
            return False
        if verdict is Verdict.COMPLETE:
            return await self._complete(campaign, why)
        if verdict is Verdict.PAUSE:
            await self._set_campaign(
                campaign.id, "wave-failed", why, state=CampaignState.PAUSED.value
            )
            return False
        await self._fail(campaign, why, rollback=verdict is Verdict.ROLLBACK)
        return False

    async def _complete(self, campaign: CampaignView, why: str) -> bool:
        busy = sum(campaign.counts[s.value] for s in IN_PROGRESS | {ExecutionState.PENDING})
        if busy:
            return True
        if campaign.continuous:
            # Devices may still join; a continuous campaign ends only when aborted.
            return True
        await self._set_campaign(
            campaign.id,
            "completed",
            why,
            state=CampaignState.COMPLETED.value,
            ended_at=datetime.now(UTC),
        )
        return False

    async def _fail(self, campaign: CampaignView, why: str, *, rollback: bool) -> None:
        """Abort the campaign and, for a rollback, create and start the campaign that rolls
        it back, in one transaction: a crash between the two must not leave an aborted
        campaign that nobody rolls back (the next pass judges the wave again instead)."""
        async with in_transaction() as conn:
            await self._fence(conn, campaign.id)
            await campaign_store.abort_campaign(campaign.id, DRIVER, why, conn)
            failpoint("campaign-driver.aborted")
            if rollback:
                await self._roll_back(campaign, why)

    async def _roll_back(self, campaign: CampaignView, why: str) -> None:
        """Inside _fail's transaction. A rollback that cannot be made is logged and leaves
        the abort standing (its savepoint is undone, not the abort)."""
        try:
            async with in_transaction():  # a savepoint
                previous = await _rollback_artifact(campaign)
                if previous is None:
                    log.warning("campaign %s: no artifact to roll back to", campaign.id)
                    return
                created = await campaign_store.rollback_campaign(campaign.id, previous, DRIVER)
                await campaign_store.start_campaign(created.id, _SYSTEM, why)
        except CitytwinError as refused:
            log.warning("campaign %s: rollback not started: %s", campaign.id, refused)

    async def _set_campaign(self, campaign_id: int, action: str, why: str, **changes: Any) -> None:
        async with in_transaction() as conn:
            row = await self._fence(conn, campaign_id)
            for name, value in changes.items():
                setattr(row, name, value)
            row.state_reason = why[:500]
            row.revision += 1
            await row.save(using_db=conn)
            await campaign_store.record_event(conn, campaign_id, action, DRIVER, why)

    # --- 3. starting devices -------------------------------------------------------------

    async def _start_devices(self, campaign: CampaignView, artifact: ArtifactView) -> None:
        now = datetime.now(UTC)
        in_progress = sum(campaign.counts[s.value] for s in IN_PROGRESS)
        recent: list[datetime] = await Execution.filter(
            campaign_id=campaign.id, started_at__gte=now - _RATE_WINDOW
        ).values_list("started_at", flat=True)  # type: ignore[assignment]
        allowed = starts_allowed(
            campaign.settings.rate_limits,
            in_progress=in_progress,
            recent_starts=[t.timestamp() for t in recent if isinstance(t, datetime)],
            now=now.timestamp(),
            succeeded=campaign.counts[ExecutionState.SUCCEEDED.value],
        )
        allowed = min(allowed, _MAX_STARTS_PER_PASS)
        if allowed <= 0:
            return
        candidates = await (
            Execution.filter(
                campaign_id=campaign.id,
                state=ExecutionState.PENDING.value,
                wave__lte=campaign.current_wave,
            )
            .order_by("position")
            .limit(max(allowed * 4, 100))
        )
        facts = await _device_facts([c.device_id for c in candidates])
        download_windows = campaign.settings.windows("download")
        started = 0
        for row in candidates:
            if started >= allowed:
                break
            fact = facts.get(row.device_id)
            if fact is not None and not is_open(download_windows, now, self._zone(campaign, fact)):
                continue
            with contextlib.suppress(_Moved):
                if await self._give_job(campaign, artifact, row, fact, retry=False):
                    started += 1

    async def _give_job(
        self,
        campaign: CampaignView,
        artifact: ArtifactView,
        row: Execution,
        fact: _DeviceFacts | None,
        *,
        retry: bool,
    ) -> bool:
        """Write the job into the device's desired state (a first attempt, a retry, or the
        install step of a downloaded image); False if the device was skipped instead."""
        now = datetime.now(UTC)
        state = ExecutionState(row.state)
        report = read_report(fact.reported) if fact else FirmwareReport()
        if state is ExecutionState.PENDING:
            skip = _skip_reason(campaign, artifact, fact, report)
            if skip is not None:
                await self._skip(campaign.id, row, *skip)
                return False
        install = fact is not None and is_open(
            campaign.settings.windows("install"), now, self._zone(campaign, fact)
        )
        action = Action.INSTALL if install else Action.DOWNLOAD
        first = state is ExecutionState.PENDING
        attempt = row.attempt + 1 if first or retry else row.attempt
        job = job_document(
            version=artifact.version,
            sha256=artifact.sha256,
            size=artifact.size,
            uri=f"/fw/{artifact.sha256}",
            signature=_b64(artifact.signature),
            manifest=self._signer.manifest_for(
                campaign_id=campaign.id,
                started_at=campaign.started_at or now,
                model=fact.model if fact else "",
                sha256=artifact.sha256,
                size=artifact.size,
                uri=f"/fw/{artifact.sha256}",
            ),
            action=action,
            attempt=attempt,
        )
        changes: dict[str, Any] = {
            "state": (
                ExecutionState.INSTALLING
                if state is ExecutionState.DOWNLOADED
                else ExecutionState.DOWNLOADING
            ).value,
            "action": action.value,
            "attempt": attempt,
            "started_at": now,
            "retry_at": None,
            "reason": "",
            "detail": "",
        }
        if first:
            changes["from_version"] = report.version[:64]
        await self._write_job(campaign.id, row, {"firmware": job}, changes)
        return True

    async def _skip(self, campaign_id: int, row: Execution, reason: str, detail: str) -> None:
        now = datetime.now(UTC)
        async with in_transaction() as conn:
            await self._fence(conn, campaign_id)
            await _move(
                conn,
                row,
                state=ExecutionState.SKIPPED.value,
                reason=reason,
                detail=detail[:256],
                ended_at=now,
            )

    def _zone(self, campaign: CampaignView, fact: _DeviceFacts) -> ZoneInfo:
        label = fact.labels.get(_TIMEZONE_LABEL)
        for name in (label, campaign.settings.time_zone):
            if name:
                with contextlib.suppress(InvalidArgument):
                    return zone_of(name)
        return self._default_zone

    # --- 4. continuous campaigns ------------------------------------------------------

    async def _add_joiners(self, campaign_id: int) -> None:
        now = datetime.now(UTC)
        async with in_transaction() as conn:
            row = await self._fence(conn, campaign_id)
            if row.last_joined_scan_at and now - row.last_joined_scan_at < self._join_scan:
                return
            known: set[str] = set(
                await Execution.filter(campaign_id=campaign_id)
                .using_db(conn)
                .values_list("device_id", flat=True)  # type: ignore[arg-type]
            )
            joiners = await campaign_store.matching_devices(row.target_filter, exclude=known)
            last_wave = max(0, len(row.wave_targets) - 1)
            await Execution.bulk_create(
                [
                    Execution(
                        campaign_id=campaign_id,
                        device_id=device_id,
                        position=row.next_position + n,
                        wave=last_wave,
                        state=ExecutionState.PENDING.value,
                        updated_at=now,
                    )
                    for n, device_id in enumerate(joiners)
                ],
                using_db=conn,
            )
            row.next_position += len(joiners)
            row.last_joined_scan_at = now
            if joiners:
                row.revision += 1
                await campaign_store.record_event(
                    conn, campaign_id, "devices-joined", DRIVER, f"{len(joiners)} devices"
                )
            await row.save(using_db=conn)


async def _move(conn: BaseDBAsyncClient, row: Execution, **changes: Any) -> None:
    """Change an execution only from the state it was read in (_Moved otherwise)."""
    changes = {k: (v.value if isinstance(v, ExecutionState) else v) for k, v in changes.items()}
    moved = (
        await Execution.filter(id=row.id, state=row.state, attempt=row.attempt)
        .using_db(conn)
        .update(**changes, updated_at=datetime.now(UTC))
    )
    if moved != 1:
        raise _Moved(row.id)
    # The pass goes on with this row (e.g. reports progress, then times out).
    for name, value in changes.items():
        setattr(row, name, value)


async def _device_facts(device_ids: Sequence[str]) -> dict[str, _DeviceFacts]:
    if not device_ids:
        return {}
    devices = await Device.filter(id__in=list(device_ids)).values(
        "id", "model", "kind", "state", "labels"
    )
    reported = dict(
        await Twin.filter(device_id__in=list(device_ids)).values_list("device_id", "reported")
    )
    return {
        d["id"]: _DeviceFacts(
            model=d["model"],
            kind=d["kind"],
            state=d["state"],
            labels=dict(d["labels"] or {}),
            reported=reported.get(d["id"]) or {},
        )
        for d in devices
    }


def _skip_reason(
    campaign: CampaignView,
    artifact: ArtifactView,
    fact: _DeviceFacts | None,
    report: FirmwareReport,
) -> tuple[str, str] | None:
    """(reason, detail) when a device should not get the image at all."""
    if fact is None or fact.state == LifecycleState.DECOMMISSIONED.value:
        return "decommissioned", "the device is decommissioned or gone"
    if artifact.compatible_kinds and fact.kind not in artifact.compatible_kinds:
        return "incompatible", f"the image is not for {fact.kind} devices"
    if artifact.compatible_models and fact.model not in artifact.compatible_models:
        return "incompatible", f"the image is not for model {fact.model}"
    if report.version and _same_version(report.version, artifact.version):
        return "up_to_date", f"the device runs {report.version} already"
    if not report.version and not campaign.settings.allow_downgrade:
        # Installing blind could downgrade it; the operator can allow that explicitly.
        return "unknown_version", "the device has not reported its running version"
    counter = fact.reported.get("firmware", {})
    security_counter = counter.get("security_counter") if isinstance(counter, dict) else None
    refusal = downgrade_refusal(
        report.version or None,
        security_counter if isinstance(security_counter, int) else None,
        artifact.version,
        artifact.security_counter,
        campaign.settings.allow_downgrade,
    )
    if refusal:
        return "downgrade", refusal
    path = upgrade_path_refusal(report.version or None, artifact.minimum_from_version or None)
    if path:
        return "upgrade_path", path
    return None


def _same_version(a: str, b: str) -> bool:
    try:
        return parse_version(a) == parse_version(b)
    except CitytwinError:
        return a == b


def _wave_counts(states: Counter[str]) -> WaveCounts:
    in_progress = sum(states[s.value] for s in IN_PROGRESS)
    counts = {
        "pending": states[ExecutionState.PENDING.value],
        "in_progress": in_progress,
        "succeeded": states[ExecutionState.SUCCEEDED.value],
        "failed": states[ExecutionState.FAILED.value],
        "timed_out": states[ExecutionState.TIMED_OUT.value],
        "skipped": states[ExecutionState.SKIPPED.value],
    }
    return WaveCounts(assigned=sum(counts.values()), **counts)


def _unwritable_reason(error: CitytwinError) -> str:
    return "incompatible" if isinstance(error, ProfileViolation) else "decommissioned"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def _artifact_version(campaign: CampaignView) -> str:
    return (await get_artifact(campaign.artifact_sha256)).version


async def _rollback_artifact(campaign: CampaignView) -> str | None:
    """The artifact of the version most updated devices ran before, if one is stored."""
    versions = Counter(
        await Execution.filter(
            campaign_id=campaign.id, state=ExecutionState.SUCCEEDED.value
        ).values_list("from_version", flat=True)
    )
    for version, _ in versions.most_common():
        found = await Artifact.filter(version=version).order_by("-created_at").first()
        if found is not None:
            return found.sha256
    return None
