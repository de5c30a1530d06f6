"""The composition root: builds the database, the gRPC server, the CoAP site and the
background loops, and runs them until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from datetime import timedelta

import aiocoap
import aiocoap.resource
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from citytwin.v1 import (
    devices_pb2,
    devices_pb2_grpc,
    profiles_pb2,
    profiles_pb2_grpc,
    twins_pb2,
    twins_pb2_grpc,
)
from provisioning.ca_store import ca_passphrase, ensure_ca
from twin import change_feed
from twin.change_feed import FeedNotifier
from twin.database import close_database, open_database
from twin.grpc_api.devices import DeviceServicer
from twin.grpc_api.interceptor import ApiInterceptor
from twin.grpc_api.profiles import ProfileServicer
from twin.grpc_api.twins import TwinServicer
from twin.settings import Settings

log = logging.getLogger(__name__)

# Bounded request size: the largest legitimate request is a 64 KiB patch plus envelope.
MAX_MESSAGE_BYTES = 1024 * 1024
_SERVICES = (
    devices_pb2.DESCRIPTOR.services_by_name["DeviceService"].full_name,
    twins_pb2.DESCRIPTOR.services_by_name["TwinService"].full_name,
    profiles_pb2.DESCRIPTOR.services_by_name["ProfileService"].full_name,
)
_TRIM_INTERVAL_SECONDS = 600.0


def build_grpc_server(settings: Settings, notifier: FeedNotifier) -> grpc.aio.Server:
    """The gRPC server with every service, health and reflection, bound but not started."""
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


def build_coap_site() -> aiocoap.resource.Site:
    """The device-facing CoAP site. For now only discovery; provisioning and the device
    twin API add their resources here."""
    site = aiocoap.resource.Site()
    site.add_resource(
        [".well-known", "core"], aiocoap.resource.WKCResource(site.get_resources_as_linkheader)
    )
    return site


async def _trim_feed_forever(retention: timedelta) -> None:
    while True:
        await asyncio.sleep(_TRIM_INTERVAL_SECONDS)
        try:
            deleted = await change_feed.trim(retention)
            if deleted:
                log.info("trimmed change feed", extra={"deleted": deleted})
        except Exception:
            log.exception("trimming the change feed failed")


async def serve(settings: Settings) -> None:
    """Run the service until SIGINT or SIGTERM. Whatever has started is stopped again, in
    reverse order, also when start-up fails half-way (so the process can exit)."""
    settings.home.mkdir(parents=True, exist_ok=True)
    async with contextlib.AsyncExitStack() as running:
        await open_database(settings.db_url)
        running.push_async_callback(close_database)
        ca = await ensure_ca(ca_passphrase(settings.home, settings.ca_passphrase))
        log.info("fleet CA ready", extra={"issuing_ca": ca.issuing_cert.subject.rfc4514_string()})
        retention = timedelta(seconds=settings.feed_retention_seconds)
        await change_feed.trim(retention)
        notifier = FeedNotifier()
        await notifier.start()
        running.push_async_callback(notifier.stop)
        grpc_server = build_grpc_server(settings, notifier)
        await grpc_server.start()
        running.push_async_callback(grpc_server.stop, 2.0)
        coap = await aiocoap.Context.create_server_context(
            build_coap_site(), bind=(settings.coap_host, settings.coap_port)
        )
        running.push_async_callback(coap.shutdown)
        trimmer = asyncio.create_task(_trim_feed_forever(retention))
        running.callback(trimmer.cancel)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        log.info(
            "citytwin serving",
            extra={"grpc": settings.grpc_address, "coap_udp": settings.coap_port},
        )
        await stop.wait()
