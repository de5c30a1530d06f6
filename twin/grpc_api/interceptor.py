"""Authentication, authorisation and error mapping for every API call, in one place.

Each RPC needs one Permission (table below); a method missing from the table is refused, so
a new RPC cannot be exposed by forgetting to list it. Health checking and reflection are
left open on purpose: load balancers probe health without credentials, and the schema that
reflection serves is public anyway.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from twin.access import Permission, Principal
from twin.errors import (
    PermissionDenied,
    Unauthenticated,
    grpc_status,
)
from twin.failures import as_service_error
from twin.tokens import authenticate

log = logging.getLogger(__name__)

_OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")

METHOD_PERMISSIONS: dict[str, Permission] = {
    "/citytwin.v1.DeviceService/CreateDevice": Permission.DEVICES_CREATE,
    "/citytwin.v1.DeviceService/GetDevice": Permission.DEVICES_READ,
    "/citytwin.v1.DeviceService/ListDevices": Permission.DEVICES_READ,
    "/citytwin.v1.DeviceService/UpdateDevice": Permission.DEVICES_UPDATE,
    "/citytwin.v1.DeviceService/DecommissionDevice": Permission.DEVICES_DECOMMISSION,
    "/citytwin.v1.TwinService/GetTwin": Permission.TWINS_READ,
    "/citytwin.v1.TwinService/UpdateDesired": Permission.DESIRED_WRITE,
    "/citytwin.v1.TwinService/UpdateReported": Permission.REPORTED_WRITE,
    "/citytwin.v1.TwinService/BulkUpdateDesired": Permission.DESIRED_WRITE,
    "/citytwin.v1.TwinService/QueryTwins": Permission.TWINS_READ,
    "/citytwin.v1.TwinService/WatchTwins": Permission.FEED_WATCH,
    "/citytwin.v1.TwinService/ReadTelemetry": Permission.TWINS_READ,
    "/citytwin.v1.TwinService/SummarizeEnergy": Permission.TWINS_READ,
    "/citytwin.v1.AlarmService/ListAlarms": Permission.ALARMS_READ,
    "/citytwin.v1.AlarmService/GetAlarm": Permission.ALARMS_READ,
    "/citytwin.v1.AlarmService/AcknowledgeAlarm": Permission.ALARMS_ACKNOWLEDGE,
    "/citytwin.v1.AlarmService/WatchAlarms": Permission.ALARMS_READ,
    "/citytwin.v1.ProfileService/GetProfile": Permission.PROFILES_READ,
    "/citytwin.v1.ProfileService/ListProfiles": Permission.PROFILES_READ,
    "/citytwin.v1.ProfileService/CreateProfile": Permission.PROFILES_WRITE,
    "/citytwin.v1.ProvisioningService/CreateEnrollment": Permission.ENROLLMENTS_CREATE,
    "/citytwin.v1.ProvisioningService/GetEnrollment": Permission.ENROLLMENTS_READ,
    "/citytwin.v1.ProvisioningService/ListEnrollments": Permission.ENROLLMENTS_READ,
    "/citytwin.v1.ProvisioningService/CancelEnrollment": Permission.ENROLLMENTS_CANCEL,
    "/citytwin.v1.ProvisioningService/CreateEnrollmentGroup": Permission.GROUPS_WRITE,
    "/citytwin.v1.ProvisioningService/GetEnrollmentGroup": Permission.GROUPS_READ,
    "/citytwin.v1.ProvisioningService/ListEnrollmentGroups": Permission.GROUPS_READ,
    "/citytwin.v1.ProvisioningService/DeleteEnrollmentGroup": Permission.GROUPS_WRITE,
    "/citytwin.v1.ProvisioningService/ListCertificates": Permission.CERTIFICATES_READ,
    "/citytwin.v1.ProvisioningService/GetCertificate": Permission.CERTIFICATES_READ,
    "/citytwin.v1.ProvisioningService/RevokeCertificate": Permission.CERTIFICATES_REVOKE,
    "/citytwin.v1.ProvisioningService/GetProvisioningPolicy": Permission.POLICY_READ,
    "/citytwin.v1.ProvisioningService/UpdateProvisioningPolicy": Permission.POLICY_WRITE,
    "/citytwin.v1.ProvisioningService/ListAuditEvents": Permission.AUDIT_READ,
    "/citytwin.v1.FirmwareService/CreateReleaseKey": Permission.RELEASE_KEYS_WRITE,
    "/citytwin.v1.FirmwareService/ListReleaseKeys": Permission.FIRMWARE_READ,
    "/citytwin.v1.FirmwareService/DeleteReleaseKey": Permission.RELEASE_KEYS_WRITE,
    "/citytwin.v1.FirmwareService/UploadArtifact": Permission.FIRMWARE_WRITE,
    "/citytwin.v1.FirmwareService/GetArtifact": Permission.FIRMWARE_READ,
    "/citytwin.v1.FirmwareService/ListArtifacts": Permission.FIRMWARE_READ,
    "/citytwin.v1.FirmwareService/DeleteArtifact": Permission.FIRMWARE_WRITE,
    "/citytwin.v1.CampaignService/CreateCampaign": Permission.CAMPAIGNS_WRITE,
    "/citytwin.v1.CampaignService/GetCampaign": Permission.CAMPAIGNS_READ,
    "/citytwin.v1.CampaignService/ListCampaigns": Permission.CAMPAIGNS_READ,
    "/citytwin.v1.CampaignService/StartCampaign": Permission.CAMPAIGNS_WRITE,
    "/citytwin.v1.CampaignService/PauseCampaign": Permission.CAMPAIGNS_WRITE,
    "/citytwin.v1.CampaignService/ResumeCampaign": Permission.CAMPAIGNS_WRITE,
    "/citytwin.v1.CampaignService/AbortCampaign": Permission.CAMPAIGNS_WRITE,
    "/citytwin.v1.CampaignService/RollbackCampaign": Permission.CAMPAIGNS_WRITE,
    "/citytwin.v1.CampaignService/ListExecutions": Permission.CAMPAIGNS_READ,
    "/citytwin.v1.CampaignService/ListCampaignEvents": Permission.CAMPAIGNS_READ,
    "/citytwin.v1.CampaignService/WatchCampaign": Permission.CAMPAIGNS_READ,
}

_principal: contextvars.ContextVar[Principal] = contextvars.ContextVar("principal")


def current_principal() -> Principal:
    """The caller of the RPC being handled."""
    return _principal.get()


def _bearer_token(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            scheme, _, token = str(value).partition(" ")
            if scheme.lower() == "bearer" and token:
                return token.strip()
            raise Unauthenticated("authorization metadata must be 'Bearer <token>'")
    raise Unauthenticated("missing bearer token (authorization: Bearer <token>)")


async def _authorize(method: str, context: grpc.aio.ServicerContext[Any, Any]) -> Principal:
    principal = await authenticate(_bearer_token(context))
    permission = METHOD_PERMISSIONS.get(method)
    if permission is None:
        raise PermissionDenied(f"{method} is not open to API callers")
    principal.require(permission)
    return principal


async def _abort(context: grpc.aio.ServicerContext[Any, Any], method: str, exc: Exception) -> None:
    """End the call with the status that `exc` means; never leak internals to the caller."""
    error = as_service_error(exc, method)
    await context.abort(grpc_status(error), str(error))


class ApiInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Wraps every API handler with authentication, authorisation and error mapping."""

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(details)
        method: str = details.method
        if handler is None or method.startswith(_OPEN_PREFIXES):
            return handler
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(method, handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary:
            # A client stream: the wrapped handler receives the request iterator.
            return grpc.stream_unary_rpc_method_handler(
                self._unary(method, handler.stream_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(method, handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        raise TypeError(f"{method}: bidirectional streams are not wrapped")

    @staticmethod
    def _unary(method: str, behavior: Any) -> Any:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            try:
                _principal.set(await _authorize(method, context))
                return await behavior(request, context)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await _abort(context, method, exc)

        return wrapped

    @staticmethod
    def _stream(method: str, behavior: Any) -> Any:
        async def wrapped(
            request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            try:
                _principal.set(await _authorize(method, context))
                async for item in behavior(request, context):
                    yield item
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await _abort(context, method, exc)

        return wrapped
