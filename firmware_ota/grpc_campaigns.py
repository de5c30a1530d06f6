"""gRPC CampaignService: decode, call the campaign store, encode."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any, Final

from citytwin.v1 import firmware_pb2, firmware_pb2_grpc
from firmware_ota import campaign_store
from firmware_ota.campaign_settings import (
    DEFAULT_DEVICE_TIMEOUT_SECONDS,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_RETRY_BACKOFF_SECONDS,
    CampaignSettings,
)
from firmware_ota.campaign_store import CampaignState, CampaignView, ExecutionView, NewCampaign
from firmware_ota.executions import IN_PROGRESS, ExecutionState
from firmware_ota.grpc_firmware import name_id
from firmware_ota.rollout_rates import RateLimits
from firmware_ota.rollout_waves import (
    DEFAULT_FAILURE_THRESHOLD,
    DEFAULT_MIN_FINISHED,
    DEFAULT_SUCCESS_THRESHOLD,
    DEFAULT_WAVES,
    FailureAction,
    WaveSpec,
)
from twin.change_feed import FeedNotifier
from twin.errors import InvalidArgument
from twin.grpc_api.convert import timestamp
from twin.grpc_api.interceptor import current_principal

_STATES = {
    CampaignState.DRAFT: firmware_pb2.CAMPAIGN_STATE_DRAFT,
    CampaignState.RUNNING: firmware_pb2.CAMPAIGN_STATE_RUNNING,
    CampaignState.PAUSED: firmware_pb2.CAMPAIGN_STATE_PAUSED,
    CampaignState.COMPLETED: firmware_pb2.CAMPAIGN_STATE_COMPLETED,
    CampaignState.ABORTED: firmware_pb2.CAMPAIGN_STATE_ABORTED,
}
_ACTIONS = {
    FailureAction.PAUSE: firmware_pb2.FAILURE_ACTION_PAUSE,
    FailureAction.ABORT: firmware_pb2.FAILURE_ACTION_ABORT,
    FailureAction.ROLLBACK: firmware_pb2.FAILURE_ACTION_ROLLBACK,
}
_ACTIONS_BACK = {v: k for k, v in _ACTIONS.items()}
_EXECUTION_STATES = {
    state: firmware_pb2.ExecutionState.Value(f"EXECUTION_STATE_{state.name}")
    for state in ExecutionState
}
_EXECUTION_STATES_BACK = {v: k for k, v in _EXECUTION_STATES.items()}
# How often a watch looks again when nothing woke it (another replica's driver does not).
_WATCH_POLL_SECONDS: Final = 1.0


def _counts(states: Counter[str]) -> firmware_pb2.ExecutionCounts:
    return firmware_pb2.ExecutionCounts(
        total=sum(states.values()),
        pending=states[ExecutionState.PENDING.value],
        in_progress=sum(states[s.value] for s in IN_PROGRESS),
        succeeded=states[ExecutionState.SUCCEEDED.value],
        failed=states[ExecutionState.FAILED.value],
        timed_out=states[ExecutionState.TIMED_OUT.value],
        skipped=states[ExecutionState.SKIPPED.value],
        cancelled=states[ExecutionState.CANCELLED.value],
    )


def _wave_status(view: CampaignView, index: int) -> str:
    if view.state is CampaignState.DRAFT or index > view.current_wave:
        return "pending"
    if index < view.current_wave or view.state is CampaignState.COMPLETED:
        return "passed"
    if view.state is CampaignState.PAUSED and "approval" in view.state_reason:
        return "awaiting-approval"
    if view.state is CampaignState.ABORTED or (
        view.state is CampaignState.PAUSED and view.state_reason.startswith("wave")
    ):
        return "failed"
    return "running"


def _wave_to_proto(spec: WaveSpec) -> firmware_pb2.Wave:
    return firmware_pb2.Wave(
        percent=spec.percent or 0.0,
        device_count=spec.device_count or 0,
        success_threshold=spec.success_threshold,
        failure_threshold=spec.failure_threshold,
        min_finished=spec.min_finished,
        on_failure=_ACTIONS[spec.on_failure],
        approval_required=spec.approval_required,
    )


def _wave_from_proto(wave: firmware_pb2.Wave) -> WaveSpec:
    if (wave.percent > 0) == (wave.device_count > 0):
        raise InvalidArgument("each wave sets exactly one of percent and device_count")
    return WaveSpec(
        percent=wave.percent or None,
        device_count=wave.device_count or None,
        success_threshold=wave.success_threshold or DEFAULT_SUCCESS_THRESHOLD,
        failure_threshold=wave.failure_threshold or DEFAULT_FAILURE_THRESHOLD,
        min_finished=wave.min_finished or DEFAULT_MIN_FINISHED,
        on_failure=_ACTIONS_BACK.get(wave.on_failure, FailureAction.PAUSE),
        approval_required=wave.approval_required,
    )


def campaign_to_proto(view: CampaignView) -> firmware_pb2.Campaign:
    """A campaign as a message."""
    settings = view.settings
    limits = settings.rate_limits
    return firmware_pb2.Campaign(
        name=f"campaigns/{view.id}",
        display_name=view.display_name,
        artifact=f"artifacts/{view.artifact_sha256}",
        target_filter=view.target_filter,
        continuous=view.continuous,
        waves=[_wave_to_proto(w) for w in settings.waves],
        rate_limits=firmware_pb2.RateLimits(
            max_concurrent=limits.max_concurrent or 0,
            starts_per_minute=limits.starts_per_minute or 0,
            ramp_base_per_minute=limits.ramp_base_per_minute or 0.0,
            ramp_factor=limits.ramp_factor or 0.0,
            ramp_every_succeeded=limits.ramp_every_succeeded or 0,
        ),
        device_timeout_seconds=settings.device_timeout_seconds,
        max_attempts=settings.max_attempts,
        retry_backoff_seconds=settings.retry_backoff_seconds,
        download_windows=list(settings.download_windows),
        install_windows=list(settings.install_windows),
        time_zone=settings.time_zone,
        allow_downgrade=settings.allow_downgrade,
        state=_STATES[view.state],
        state_reason=view.state_reason,
        current_wave=view.current_wave,
        wave_status=[
            firmware_pb2.WaveStatus(
                index=index,
                target_count=target,
                counts=_counts(view.wave_counts.get(index, Counter())),
                status=_wave_status(view, index),
            )
            for index, target in enumerate(view.wave_targets)
        ],
        counts=_counts(view.counts),
        rollback_of=f"campaigns/{view.rollback_of}" if view.rollback_of else "",
        create_time=timestamp(view.created_at),
        start_time=timestamp(view.started_at),
        end_time=timestamp(view.ended_at),
        created_by=view.created_by,
    )


def _settings(message: firmware_pb2.Campaign) -> CampaignSettings:
    limits = message.rate_limits
    return CampaignSettings(
        waves=tuple(_wave_from_proto(w) for w in message.waves) or DEFAULT_WAVES,
        rate_limits=RateLimits(
            max_concurrent=limits.max_concurrent or None,
            starts_per_minute=limits.starts_per_minute or None,
            ramp_base_per_minute=limits.ramp_base_per_minute or None,
            ramp_factor=limits.ramp_factor or None,
            ramp_every_succeeded=limits.ramp_every_succeeded or None,
        ),
        device_timeout_seconds=message.device_timeout_seconds or DEFAULT_DEVICE_TIMEOUT_SECONDS,
        max_attempts=message.max_attempts or DEFAULT_MAX_ATTEMPTS,
        retry_backoff_seconds=message.retry_backoff_seconds or DEFAULT_RETRY_BACKOFF_SECONDS,
        download_windows=tuple(message.download_windows),
        install_windows=tuple(message.install_windows),
        time_zone=message.time_zone,
        allow_downgrade=message.allow_downgrade,
    )


def execution_to_proto(view: ExecutionView) -> firmware_pb2.Execution:
    """An execution as a message."""
    return firmware_pb2.Execution(
        name=f"campaigns/{view.campaign_id}/executions/{view.device_id}",
        device=f"devices/{view.device_id}",
        wave=view.wave,
        position=view.position,
        state=_EXECUTION_STATES[view.state],
        from_version=view.from_version,
        attempt=view.attempt,
        progress=view.progress,
        failure_reason=view.reason,
        detail=view.detail,
        start_time=timestamp(view.started_at),
        update_time=timestamp(view.updated_at),
        end_time=timestamp(view.ended_at),
        retry_time=timestamp(view.retry_at),
    )


def _campaign_id(name: str) -> int:
    ident = name_id(name, "campaigns")
    if not ident.isdigit():
        raise InvalidArgument(f"name {name!r} is not of the form campaigns/{{campaign_id}}")
    return int(ident)


class CampaignServicer(firmware_pb2_grpc.CampaignServiceServicer):
    """Campaigns over gRPC."""

    def __init__(self, notifier: FeedNotifier) -> None:
        self._notifier = notifier

    async def CreateCampaign(
        self, request: firmware_pb2.CreateCampaignRequest, context: Any
    ) -> firmware_pb2.Campaign:
        c = request.campaign
        new = NewCampaign(
            display_name=c.display_name,
            artifact_sha256=name_id(c.artifact, "artifacts"),
            target_filter=c.target_filter,
            continuous=c.continuous,
            settings=_settings(c),
        )
        return campaign_to_proto(await campaign_store.create_campaign(new, current_principal()))

    async def GetCampaign(
        self, request: firmware_pb2.GetCampaignRequest, context: Any
    ) -> firmware_pb2.Campaign:
        return campaign_to_proto(await campaign_store.get_campaign(_campaign_id(request.name)))

    async def ListCampaigns(
        self, request: firmware_pb2.ListCampaignsRequest, context: Any
    ) -> firmware_pb2.ListCampaignsResponse:
        views, token = await campaign_store.list_campaigns(request.page_size, request.page_token)
        return firmware_pb2.ListCampaignsResponse(
            campaigns=[campaign_to_proto(v) for v in views], next_page_token=token
        )

    async def StartCampaign(
        self, request: firmware_pb2.CampaignActionRequest, context: Any
    ) -> firmware_pb2.Campaign:
        view = await campaign_store.start_campaign(
            _campaign_id(request.name), current_principal(), request.reason
        )
        self._notifier.wake()
        return campaign_to_proto(view)

    async def PauseCampaign(
        self, request: firmware_pb2.CampaignActionRequest, context: Any
    ) -> firmware_pb2.Campaign:
        return campaign_to_proto(
            await campaign_store.pause_campaign(
                _campaign_id(request.name), current_principal(), request.reason
            )
        )

    async def ResumeCampaign(
        self, request: firmware_pb2.CampaignActionRequest, context: Any
    ) -> firmware_pb2.Campaign:
        view = await campaign_store.resume_campaign(
            _campaign_id(request.name), current_principal(), request.reason
        )
        self._notifier.wake()
        return campaign_to_proto(view)

    async def AbortCampaign(
        self, request: firmware_pb2.CampaignActionRequest, context: Any
    ) -> firmware_pb2.Campaign:
        campaign_id = _campaign_id(request.name)
        await campaign_store.abort_campaign(
            campaign_id, campaign_store.actor_of(current_principal()), request.reason
        )
        return campaign_to_proto(await campaign_store.get_campaign(campaign_id))

    async def RollbackCampaign(
        self, request: firmware_pb2.RollbackCampaignRequest, context: Any
    ) -> firmware_pb2.Campaign:
        view = await campaign_store.rollback_campaign(
            _campaign_id(request.name),
            name_id(request.artifact, "artifacts"),
            campaign_store.actor_of(current_principal()),
        )
        return campaign_to_proto(view)

    async def ListExecutions(
        self, request: firmware_pb2.ListExecutionsRequest, context: Any
    ) -> firmware_pb2.ListExecutionsResponse:
        state = _EXECUTION_STATES_BACK.get(request.state)
        views, token = await campaign_store.list_executions(
            _campaign_id(request.parent), state, request.page_size, request.page_token
        )
        return firmware_pb2.ListExecutionsResponse(
            executions=[execution_to_proto(v) for v in views], next_page_token=token
        )

    async def ListCampaignEvents(
        self, request: firmware_pb2.ListCampaignEventsRequest, context: Any
    ) -> firmware_pb2.ListCampaignEventsResponse:
        events, token = await campaign_store.list_events(
            _campaign_id(request.parent), request.page_size, request.page_token
        )
        return firmware_pb2.ListCampaignEventsResponse(
            events=[
                firmware_pb2.CampaignEvent(
                    time=timestamp(e.at), action=e.action, actor=e.actor, detail=e.detail
                )
                for e in events
            ],
            next_page_token=token,
        )

    async def WatchCampaign(
        self, request: firmware_pb2.GetCampaignRequest, context: Any
    ) -> AsyncIterator[firmware_pb2.Campaign]:
        campaign_id = _campaign_id(request.name)
        last: firmware_pb2.Campaign | None = None
        while True:
            waiter = self._notifier.waiter()
            message = campaign_to_proto(await campaign_store.get_campaign(campaign_id))
            if message != last:
                yield message
                last = message
            if (
                message.state
                in (
                    firmware_pb2.CAMPAIGN_STATE_COMPLETED,
                    firmware_pb2.CAMPAIGN_STATE_ABORTED,
                )
                and not message.counts.in_progress
            ):
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiter.wait(), _WATCH_POLL_SECONDS)
