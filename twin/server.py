"""The composition root: builds the database, the gRPC server, the CoAP site and the
background loops, and runs them until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl
from collections.abc import Awaitable, Callable
from datetime import timedelta

import aiocoap
import aiocoap.resource
import grpc
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from citytwin.v1 import (
    alarms_pb2,
    alarms_pb2_grpc,
    devices_pb2,
    devices_pb2_grpc,
    firmware_pb2,
    firmware_pb2_grpc,
    profiles_pb2,
    profiles_pb2_grpc,
    provisioning_pb2,
    provisioning_pb2_grpc,
    twins_pb2,
    twins_pb2_grpc,
)
from firmware_ota.campaign_driver import CampaignDriver
from firmware_ota.download_resources import add_firmware_resources
from firmware_ota.grpc_campaigns import CampaignServicer
from firmware_ota.grpc_firmware import FirmwareServicer
from firmware_ota.manifest_signing import ManifestSigner, ensure_manifest_key, public_key_pem
from provisioning.ca_store import ca_passphrase, ensure_ca
from provisioning.certificate_authority import CertificateAuthority
from provisioning.enrollment_groups import all_group_ca_pems
from provisioning.est_enrollment import Enroller
from provisioning.est_resources import add_est_resources
from provisioning.grpc_servicer import ProvisioningServicer
from provisioning.rate_limits import FailureLimiter
from provisioning.server_identity import ServerIdentity, issue_server_identity
from twin import change_feed
from twin.change_feed import FeedNotifier
from twin.coap_tls import add_client_ca, server_ssl_context, start_tls_server
from twin.database import close_database, open_database
from twin.device_observers import DeviceObservers, push_changes_forever
from twin.device_resources import DeviceSide, add_device_resources
from twin.grpc_api.alarms import AlarmServicer
from twin.grpc_api.devices import DeviceServicer
from twin.grpc_api.interceptor import ApiInterceptor
from twin.grpc_api.profiles import ProfileServicer
from twin.grpc_api.twins import TwinServicer
from twin.liveness_store import Liveness
from twin.reconciler import renotify_due
from twin.settings import Settings
from twin.telemetry_store import trim_telemetry
from twin.write_rate_limits import WriteRateLimiter

log = logging.getLogger(__name__)

# Bounded request size: the largest legitimate request is a 64 KiB patch plus envelope.
MAX_MESSAGE_BYTES = 1024 * 1024
_SERVICES = (
    devices_pb2.DESCRIPTOR.services_by_name["DeviceService"].full_name,
    twins_pb2.DESCRIPTOR.services_by_name["TwinService"].full_name,
    profiles_pb2.DESCRIPTOR.services_by_name["ProfileService"].full_name,
    provisioning_pb2.DESCRIPTOR.services_by_name["ProvisioningService"].full_name,
    alarms_pb2.DESCRIPTOR.services_by_name["AlarmService"].full_name,
    firmware_pb2.DESCRIPTOR.services_by_name["FirmwareService"].full_name,
    firmware_pb2.DESCRIPTOR.services_by_name["CampaignService"].full_name,
)
_TRUST_REFRESH_SECONDS = 10.0
_RENOTIFY_SECONDS = 1.0
_TRIM_INTERVAL_SECONDS = 600.0


def build_grpc_server(
    settings: Settings, notifier: FeedNotifier, trust_client_ca: Callable[[bytes], None]
) -> grpc.aio.Server:
    """The gRPC server with every service, health and reflection, bound but not started.
    `trust_client_ca` makes a new enrollment group's CA trusted by the CoAP TLS server."""
    server = grpc.aio.server(
        interceptors=[ApiInterceptor()],
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ],
    )
    devices_pb2_grpc.add_DeviceServiceServicer_to_server(DeviceServicer(notifier), server)
    twins_pb2_grpc.add_TwinServiceServicer_to_server(TwinServicer(notifier), server)
    profiles_pb2_grpc.add_ProfileServiceServicer_to_server(ProfileServicer(), server)
    alarms_pb2_grpc.add_AlarmServiceServicer_to_server(AlarmServicer(notifier), server)
    provisioning_pb2_grpc.add_ProvisioningServiceServicer_to_server(
        ProvisioningServicer(notifier, trust_client_ca), server
    )
    firmware_pb2_grpc.add_FirmwareServiceServicer_to_server(
        FirmwareServicer(settings.max_artifact_bytes), server
    )
    firmware_pb2_grpc.add_CampaignServiceServicer_to_server(CampaignServicer(notifier), server)
    # health.aio is the public async servicer; the package re-exports it without typing it.
    health_servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", *_SERVICES):
        asyncio.get_running_loop().create_task(
            health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        )
    reflection.enable_server_reflection((*_SERVICES, reflection.SERVICE_NAME), server)
    if settings.tls_cert and settings.tls_key:
        credentials = grpc.ssl_server_credentials(
            [(settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())]
        )
        server.add_secure_port(settings.grpc_address, credentials)
    else:
        server.add_insecure_port(settings.grpc_address)
    return server


def build_coap_site(
    enroller: Enroller, settings: Settings, side: DeviceSide, manifest_key_pem: bytes
) -> aiocoap.resource.Site:
    """The device-facing CoAP site: discovery, EST-coaps provisioning, device twins,
    firmware downloads."""
    site = aiocoap.resource.Site()
    site.add_resource(
        [".well-known", "core"],
        aiocoap.resource.WKCResource(site.get_resources_as_linkheader, impl_info=None),
    )
    add_est_resources(site, enroller, allow_insecure_enrollment=settings.allow_coap_enrollment)
    add_device_resources(site, side, settings.time_zone)
    add_firmware_resources(site, side, manifest_key_pem)
    return site


def _server_identity(settings: Settings, ca: CertificateAuthority) -> ServerIdentity:
    if settings.coaps_cert and settings.coaps_key:
        return ServerIdentity(settings.coaps_cert.read_bytes(), settings.coaps_key.read_bytes())
    return issue_server_identity(ca, settings.coaps_names)


async def start_coap(
    settings: Settings, site: aiocoap.resource.Site, ca: CertificateAuthority
) -> tuple[aiocoap.Context, ssl.SSLContext]:
    """CoAP on UDP (discovery, CA certificates) and CoAP over TLS (everything a device does),
    sharing one site."""
    coap = await aiocoap.Context.create_server_context(
        site, bind=(settings.coap_host, settings.coap_port), transports=["udp6"]
    )
    identity = _server_identity(settings, ca)
    fleet = [c.public_bytes(serialization.Encoding.PEM) for c in (ca.issuing_cert, ca.root_cert)]
    tls = server_ssl_context(
        identity.chain_pem, identity.key_pem, fleet + await all_group_ca_pems()
    )
    await start_tls_server(
        coap,
        settings.coap_host,
        settings.coaps_port,
        tls,
        max_connections=settings.coaps_max_connections,
        idle_timeout=settings.coaps_idle_seconds,
        max_handshakes=settings.coaps_max_handshakes,
    )
    return coap, tls


async def _trust_new_groups_forever(tls: ssl.SSLContext) -> None:
    """Enrollment groups created on any replica become trusted client CAs here too (removed
    ones stay in the TLS trust store until restart, but are refused by the enroller)."""
    known = set(await all_group_ca_pems())
    while True:
        await asyncio.sleep(_TRUST_REFRESH_SECONDS)
        try:
            for pem in await all_group_ca_pems():
                if pem not in known:
                    add_client_ca(tls, pem)
                    known.add(pem)
        except Exception:
            log.exception("refreshing the trusted enrollment-group CAs failed")


async def _every(seconds: float, work: Callable[[], Awaitable[object]], what: str) -> None:
    """Run `work` every `seconds` for ever; a failure is logged and retried next time."""
    while True:
        await asyncio.sleep(seconds)
        try:
            done = await work()
            if done:
                log.info(what, extra={"count": done})
        except Exception:
            log.exception("%s failed", what)


def _failure_limiter(settings: Settings) -> FailureLimiter:
    return FailureLimiter(
        max_failures=settings.enroll_max_failures,
        window_seconds=settings.enroll_failure_window_seconds,
    )


async def serve(settings: Settings) -> None:
    """Run the service until SIGINT or SIGTERM. Whatever has started is stopped again, in
    reverse order, also when start-up fails half-way (so the process can exit)."""
    settings.home.mkdir(parents=True, exist_ok=True)
    async with contextlib.AsyncExitStack() as running:
        await open_database(settings.db_url)
        running.push_async_callback(close_database)
        passphrase = ca_passphrase(settings.home, settings.ca_passphrase)
        ca = await ensure_ca(passphrase)
        manifest_key = await ensure_manifest_key(passphrase)
        log.info("fleet CA ready", extra={"issuing_ca": ca.issuing_cert.subject.rfc4514_string()})
        retention = timedelta(seconds=settings.feed_retention_seconds)
        await change_feed.trim(retention)
        notifier = FeedNotifier()
        await notifier.start()
        running.push_async_callback(notifier.stop)
        enroller = Enroller(
            ca,
            notifier,
            by_source=_failure_limiter(settings),
            by_serial=_failure_limiter(settings),
        )
        observers = DeviceObservers()
        liveness = Liveness(notifier, settings.offline_tolerance)
        running.push_async_callback(liveness.close)
        write_limits = WriteRateLimiter(
            settings.device_writes_per_minute, settings.device_write_burst
        )
        side = DeviceSide.create(notifier, observers, liveness, write_limits)
        # Stopped after the CoAP side (so no report comes in), before the database closes.
        running.push_async_callback(side.close)
        site = build_coap_site(enroller, settings, side, public_key_pem(manifest_key))
        coap, tls = await start_coap(settings, site, ca)
        running.push_async_callback(coap.shutdown)
        grpc_server = build_grpc_server(settings, notifier, lambda pem: add_client_ca(tls, pem))
        await grpc_server.start()
        running.push_async_callback(grpc_server.stop, 2.0)
        telemetry_retention = timedelta(seconds=settings.telemetry_retention_seconds)
        driver = CampaignDriver(
            notifier,
            ManifestSigner(manifest_key),
            settings.time_zone,
            lease=timedelta(seconds=settings.campaign_lease_seconds),
            join_scan=timedelta(seconds=settings.campaign_join_scan_seconds),
        )
        running.push_async_callback(driver.release_all)
        for loop_forever in (
            _every(_TRIM_INTERVAL_SECONDS, lambda: change_feed.trim(retention), "feed trimmed"),
            _every(
                _TRIM_INTERVAL_SECONDS,
                lambda: trim_telemetry(telemetry_retention),
                "telemetry trimmed",
            ),
            _every(settings.liveness_sweep_seconds, liveness.sweep, "devices went offline"),
            _every(_RENOTIFY_SECONDS, lambda: renotify_due(observers), "devices re-notified"),
            _trust_new_groups_forever(tls),
            push_changes_forever(notifier, observers),
            driver.run_forever(settings.campaign_pass_seconds),
        ):
            task = asyncio.create_task(loop_forever)
            running.callback(task.cancel)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        log.info(
            "citytwin serving",
            extra={
                "grpc": settings.grpc_address,
                "coap_udp": settings.coap_port,
                "coaps_tcp": settings.coaps_port,
            },
        )
        await stop.wait()
