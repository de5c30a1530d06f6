"""The device-facing twin API on CoAP: what a device, authenticated by its certificate on
`coaps+tcp`, may read of its own twin. (Reports, Observe and telemetry build on this.)"""

from __future__ import annotations

import json

import aiocoap
import aiocoap.resource
from aiocoap.numbers import ContentFormat
from aiocoap.numbers.codes import Code

from provisioning.device_certificates import identify_device
from twin.access import device_principal
from twin.coap_resources import BoundedResource, negotiate_accept
from twin.coap_tls import peer_certificate
from twin.twin_store import get_twin

JSON = 50


class OwnTwin(BoundedResource):
    """`/twin`: GET the requesting device's whole twin (desired, reported, delta, version)."""

    rt = "citytwin.twin"
    ct = str(JSON)

    def __init__(self) -> None:
        super().__init__(max_body_bytes=0)

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        """The twin of the device whose certificate the connection presented."""
        negotiate_accept(request, JSON)
        identity = await identify_device(peer_certificate(request))
        twin = await get_twin(identity.device_id, device_principal(identity.device_id))
        body = {
            "device": identity.device_id,
            "version": twin.version,
            "desired": twin.desired,
            "reported": twin.reported,
            "delta": twin.delta,
        }
        return aiocoap.Message(
            code=Code.CONTENT,
            payload=json.dumps(body, separators=(",", ":")).encode(),
            content_format=ContentFormat(JSON),
        )


def add_device_resources(site: aiocoap.resource.Site) -> None:
    """Add the device twin resources to the CoAP site."""
    site.add_resource(["twin"], OwnTwin())
