"""Campaigns in the database: creation, the operator's transitions, and reading them back.

Every transition is one transaction that changes the campaign row only from the state it was
read in and writes its audit event with it, so two callers racing (or an operator racing the
driver) cannot both win. The driver's own transitions are in campaign_driver.py.
"""

from __future__ import annotations

import secrets
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Final

from tortoise.backends.base.client import BaseDBAsyncClient
from tortoise.functions import Count
from tortoise.transactions import in_transaction

from firmware_ota.campaign_settings import (
    CampaignSettings,
    check_settings,
    settings_from_json,
    settings_to_json,
)
from firmware_ota.executions import ACTIVE, IN_PROGRESS, ExecutionState
from firmware_ota.models import Artifact, Campaign, CampaignEvent, Execution
from firmware_ota.rollout_waves import shuffled, wave_of, wave_targets
from twin.access import Principal
from twin.errors import FailedPrecondition, InvalidArgument, NotFound
from twin.page_tokens import decode_numeric_page_token, page_size, split_page
from twin.registry import LifecycleState, scan_devices
from twin.selectors import parse_selector

MAX_FILTER: Final = 1024
MAX_REASON: Final = 500
DRIVER: Final = "citytwin"
_INSERT_BATCH: Final = 1000


class CampaignState(StrEnum):
    """The life of a campaign."""

    DRAFT = "draft"
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    ABORTED = "aborted"


ENDED: Final = frozenset({CampaignState.COMPLETED, CampaignState.ABORTED})


@dataclass(frozen=True)
class NewCampaign:
    """What CreateCampaign asks for."""

    display_name: str
    artifact_sha256: str
    target_filter: str
    continuous: bool
    settings: CampaignSettings


@dataclass(frozen=True)
class CampaignView:
    """A campaign with its execution counts, overall and per wave."""

    id: int
    display_name: str
    artifact_sha256: str
    target_filter: str
    continuous: bool
    settings: CampaignSettings
    state: CampaignState
    state_reason: str
    current_wave: int
    wave_targets: tuple[int, ...]
    approved_through: int
    rollback_of: int | None
    created_by: str
    created_at: datetime
    started_at: datetime | None
    ended_at: datetime | None
    revision: int
    counts: Counter[str] = field(default_factory=Counter)
    wave_counts: dict[int, Counter[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class EventView:
    """One audit event."""

    at: datetime
    action: str
    actor: str
    detail: str


def actor_of(principal: Principal) -> str:
    """How the audit log names a caller."""
    return f"tokens/{principal.token_id}"


async def record_event(
    conn: BaseDBAsyncClient, campaign_id: int, action: str, actor: str, detail: str = ""
) -> None:
    """Append one audit event (inside the transition's transaction)."""
    await CampaignEvent.create(
        using_db=conn,
        campaign_id=campaign_id,
        at=datetime.now(UTC),
        action=action,
        actor=actor,
        detail=detail[:1024],
    )


async def create_campaign(new: NewCampaign, principal: Principal) -> CampaignView:
    """A DRAFT campaign; InvalidArgument for a bad filter or settings, NotFound for an
    unknown artifact."""
    if len(new.target_filter) > MAX_FILTER:
        raise InvalidArgument(f"target_filter is longer than {MAX_FILTER} characters")
    if not new.target_filter.strip():
        raise InvalidArgument("target_filter is required (e.g. 'kind=lamp,district=north')")
    parse_selector(new.target_filter)
    check_settings(new.settings)
    if len(new.display_name) > 200:
        raise InvalidArgument("display_name is longer than 200 characters")
    if not await Artifact.exists(sha256=new.artifact_sha256):
        raise NotFound(f"artifact {new.artifact_sha256} does not exist")
    return await _insert(new, actor_of(principal), rollback_of=None)


async def _insert(new: NewCampaign, actor: str, rollback_of: int | None) -> CampaignView:
    async with in_transaction() as conn:
        row = await Campaign.create(
            using_db=conn,
            display_name=new.display_name,
            artifact_id=new.artifact_sha256,
            target_filter=new.target_filter,
            continuous=new.continuous,
            settings=settings_to_json(new.settings),
            state=CampaignState.DRAFT.value,
            seed=secrets.token_hex(16),
            rollback_of=rollback_of,
            created_by=actor,
            created_at=datetime.now(UTC),
        )
        detail = f"rollback of campaigns/{rollback_of}" if rollback_of else ""
        await record_event(conn, row.id, "created", actor, detail)
    return await get_campaign(row.id)


def _view(row: Campaign, counts: Sequence[tuple[int, str, int]] = ()) -> CampaignView:
    total: Counter[str] = Counter()
    per_wave: dict[int, Counter[str]] = {}
    for wave, state, n in counts:
        total[state] += n
        per_wave.setdefault(wave, Counter())[state] += n
    return CampaignView(
        id=row.id,
        display_name=row.display_name,
        artifact_sha256=row.artifact_id,  # type: ignore[attr-defined]
        target_filter=row.target_filter,
        continuous=row.continuous,
        settings=settings_from_json(row.settings),
        state=CampaignState(row.state),
        state_reason=row.state_reason,
        current_wave=row.current_wave,
        wave_targets=tuple(row.wave_targets),
        approved_through=row.approved_through,
        rollback_of=row.rollback_of,
        created_by=row.created_by,
        created_at=row.created_at,
        started_at=row.started_at,
        ended_at=row.ended_at,
        revision=row.revision,
        counts=total,
        wave_counts=per_wave,
    )


async def execution_counts(
    campaign_id: int, conn: BaseDBAsyncClient | None = None
) -> list[tuple[int, str, int]]:
    """(wave, state, count) of a campaign's executions."""
    query = Execution.filter(campaign_id=campaign_id)
    if conn is not None:
        query = query.using_db(conn)
    rows = (
        await query.annotate(n=Count("id"))
        .group_by("wave", "state")
        .values_list("wave", "state", "n")
    )
    return [(int(w), str(s), int(n)) for w, s, n in rows]


async def get_campaign(campaign_id: int) -> CampaignView:
    """One campaign with its counts; NotFound if unknown."""
    row = await Campaign.get_or_none(id=campaign_id)
    if row is None:
        raise NotFound(f"campaign {campaign_id} does not exist")
    return _view(row, await execution_counts(campaign_id))


async def list_campaigns(requested_size: int, token: str) -> tuple[list[CampaignView], str]:
    """A page of campaigns, newest first (without per-state counts), and the next token."""
    size = page_size(requested_size)
    before = decode_numeric_page_token(token, "campaigns")
    query = Campaign.all().order_by("-id")
    if before is not None:
        query = query.filter(id__lt=before)
    rows = await query.limit(size + 1)
    page, next_token = split_page(rows, size, lambda r: str(r.id), "campaigns")
    return [_view(r) for r in page], next_token


async def _transition(
    campaign_id: int,
    allowed: frozenset[CampaignState],
    action: str,
    actor: str,
    reason: str,
    *,
    conn: BaseDBAsyncClient,
) -> Campaign:
    if len(reason) > MAX_REASON:
        raise InvalidArgument(f"reason is longer than {MAX_REASON} characters")
    row = await Campaign.filter(id=campaign_id).using_db(conn).select_for_update().first()
    if row is None:
        raise NotFound(f"campaign {campaign_id} does not exist")
    if CampaignState(row.state) not in allowed:
        raise FailedPrecondition(f"campaign {campaign_id} is {row.state}; it cannot be {action}")
    await record_event(conn, campaign_id, action, actor, reason)
    row.revision += 1
    return row


async def start_campaign(campaign_id: int, principal: Principal, reason: str) -> CampaignView:
    """Evaluate the target, fix the random order and the waves, and set the campaign
    RUNNING, in one transaction."""
    async with in_transaction() as conn:
        row = await _transition(
            campaign_id,
            frozenset({CampaignState.DRAFT}),
            "started",
            actor_of(principal),
            reason,
            conn=conn,
        )
        settings = settings_from_json(row.settings)
        devices = await _target(row, conn)
        order = shuffled(devices, row.seed)
        targets = wave_targets(len(order), settings.waves)
        now = datetime.now(UTC)
        for start in range(0, len(order), _INSERT_BATCH):
            await Execution.bulk_create(
                [
                    Execution(
                        campaign_id=campaign_id,
                        device_id=device_id,
                        position=position,
                        wave=wave_of(position, targets),
                        state=ExecutionState.PENDING.value,
                        updated_at=now,
                    )
                    for position, device_id in enumerate(
                        order[start : start + _INSERT_BATCH], start=start
                    )
                ],
                using_db=conn,
            )
        row.state = CampaignState.RUNNING.value
        row.state_reason = f"{len(order)} devices targeted"
        row.wave_targets = targets
        row.next_position = len(order)
        row.started_at = now
        row.last_joined_scan_at = now
        await row.save(using_db=conn)
    return await get_campaign(campaign_id)


async def _target(row: Campaign, conn: BaseDBAsyncClient) -> list[str]:
    """The devices a campaign targets at its start: a rollback's are exactly those its
    original updated; any other's are the live devices its filter matches."""
    if row.rollback_of is not None:
        ids = await (
            Execution.filter(campaign_id=row.rollback_of, state=ExecutionState.SUCCEEDED.value)
            .using_db(conn)
            .values_list("device_id", flat=True)
        )
        return sorted(str(i) for i in ids)
    return await matching_devices(row.target_filter)


async def matching_devices(target_filter: str, exclude: set[str] | None = None) -> list[str]:
    """The live devices a campaign's filter matches now, but those in `exclude`."""
    skip = exclude or set()
    return [
        view.id
        async for view, _ in scan_devices(parse_selector(target_filter))
        if view.state != LifecycleState.DECOMMISSIONED and view.id not in skip
    ]


async def pause_campaign(campaign_id: int, principal: Principal, reason: str) -> CampaignView:
    """RUNNING → PAUSED: no further device starts; those updating finish."""
    async with in_transaction() as conn:
        row = await _transition(
            campaign_id,
            frozenset({CampaignState.RUNNING}),
            "paused",
            actor_of(principal),
            reason,
            conn=conn,
        )
        row.state = CampaignState.PAUSED.value
        row.state_reason = f"paused by {actor_of(principal)}" + (f": {reason}" if reason else "")
        await row.save(using_db=conn)
    return await get_campaign(campaign_id)


async def resume_campaign(campaign_id: int, principal: Principal, reason: str) -> CampaignView:
    """PAUSED → RUNNING; resuming a campaign that waits for approval approves the next wave,
    and resuming after a failed wave lets the driver judge it afresh (the operator has
    looked at it)."""
    async with in_transaction() as conn:
        row = await _transition(
            campaign_id,
            frozenset({CampaignState.PAUSED}),
            "resumed",
            actor_of(principal),
            reason,
            conn=conn,
        )
        row.state = CampaignState.RUNNING.value
        row.state_reason = f"resumed by {actor_of(principal)}" + (f": {reason}" if reason else "")
        row.approved_through = row.current_wave
        await row.save(using_db=conn)
    return await get_campaign(campaign_id)


async def abort_campaign(
    campaign_id: int, actor: str, reason: str, conn: BaseDBAsyncClient | None = None
) -> None:
    """Any state but ended → ABORTED: pending and waiting executions are cancelled at once;
    the driver withdraws jobs not yet installing and lets installing devices finish."""
    if conn is None:
        async with in_transaction() as own:
            await abort_campaign(campaign_id, actor, reason, own)
        return
    row = await _transition(
        campaign_id,
        frozenset({CampaignState.DRAFT, CampaignState.RUNNING, CampaignState.PAUSED}),
        "aborted",
        actor,
        reason,
        conn=conn,
    )
    now = datetime.now(UTC)
    await (
        Execution.filter(
            campaign_id=campaign_id,
            state__in=[ExecutionState.PENDING.value, ExecutionState.RETRY_WAIT.value],
        )
        .using_db(conn)
        .update(state=ExecutionState.CANCELLED.value, updated_at=now, ended_at=now)
    )
    row.state = CampaignState.ABORTED.value
    row.state_reason = reason or f"aborted by {actor}"
    row.ended_at = now
    await row.save(using_db=conn)


async def rollback_campaign(campaign_id: int, artifact_sha256: str, actor: str) -> CampaignView:
    """A DRAFT campaign installing `artifact_sha256` on exactly the devices `campaign_id`
    updated, downgrade allowed, in one wave-by-wave rollout like its original's."""
    original = await get_campaign(campaign_id)
    if not await Artifact.exists(sha256=artifact_sha256):
        raise NotFound(f"artifact {artifact_sha256} does not exist")
    if artifact_sha256 == original.artifact_sha256:
        raise InvalidArgument("a rollback installs another artifact than the campaign did")
    new = NewCampaign(
        display_name=f"rollback of {original.display_name or f'campaign {campaign_id}'}"[:200],
        artifact_sha256=artifact_sha256,
        target_filter=f"rollback of campaigns/{campaign_id}",
        continuous=False,
        settings=CampaignSettings(
            waves=original.settings.waves,
            rate_limits=original.settings.rate_limits,
            device_timeout_seconds=original.settings.device_timeout_seconds,
            max_attempts=original.settings.max_attempts,
            retry_backoff_seconds=original.settings.retry_backoff_seconds,
            time_zone=original.settings.time_zone,
            allow_downgrade=True,
        ),
    )
    created = await _insert(new, actor, rollback_of=campaign_id)
    async with in_transaction() as conn:
        await record_event(conn, campaign_id, "rollback-created", actor, f"campaigns/{created.id}")
    return created


@dataclass(frozen=True)
class ExecutionView:
    """One device's execution."""

    campaign_id: int
    device_id: str
    wave: int
    position: int
    state: ExecutionState
    from_version: str
    attempt: int
    progress: int
    reason: str
    detail: str
    started_at: datetime | None
    updated_at: datetime
    ended_at: datetime | None
    retry_at: datetime | None


def execution_view(row: Execution) -> ExecutionView:
    """The view of an execution row."""
    return ExecutionView(
        campaign_id=row.campaign_id,  # type: ignore[attr-defined]
        device_id=row.device_id,
        wave=row.wave,
        position=row.position,
        state=ExecutionState(row.state),
        from_version=row.from_version,
        attempt=row.attempt,
        progress=row.progress,
        reason=row.reason,
        detail=row.detail,
        started_at=row.started_at,
        updated_at=row.updated_at,
        ended_at=row.ended_at,
        retry_at=row.retry_at,
    )


async def list_executions(
    campaign_id: int, state: ExecutionState | None, requested_size: int, token: str
) -> tuple[list[ExecutionView], str]:
    """A page of a campaign's executions in rollout order, and the next token."""
    if not await Campaign.exists(id=campaign_id):
        raise NotFound(f"campaign {campaign_id} does not exist")
    size = page_size(requested_size)
    fingerprint = f"executions/{campaign_id}/{state or ''}"
    after = decode_numeric_page_token(token, fingerprint)
    query = Execution.filter(campaign_id=campaign_id).order_by("position")
    if state is not None:
        query = query.filter(state=state.value)
    if after is not None:
        query = query.filter(position__gt=after)
    rows = await query.limit(size + 1)
    page, next_token = split_page(rows, size, lambda r: str(r.position), fingerprint)
    return [execution_view(r) for r in page], next_token


async def list_events(
    campaign_id: int, requested_size: int, token: str
) -> tuple[list[EventView], str]:
    """A page of a campaign's audit log, oldest first, and the next token."""
    if not await Campaign.exists(id=campaign_id):
        raise NotFound(f"campaign {campaign_id} does not exist")
    size = page_size(requested_size)
    fingerprint = f"events/{campaign_id}"
    after = decode_numeric_page_token(token, fingerprint)
    query = CampaignEvent.filter(campaign_id=campaign_id).order_by("id")
    if after is not None:
        query = query.filter(id__gt=after)
    rows = await query.limit(size + 1)
    page, next_token = split_page(rows, size, lambda r: str(r.id), fingerprint)
    return [EventView(r.at, r.action, r.actor, r.detail) for r in page], next_token


async def assigned_to(device_id: str, sha256: str) -> bool:
    """Whether the device holds a job for this artifact now (only such devices may download
    it)."""
    return await Execution.filter(
        device_id=device_id,
        campaign__artifact_id=sha256,
        state__in=[s.value for s in IN_PROGRESS | ACTIVE],
    ).exists()
