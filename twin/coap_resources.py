"""What every device-facing CoAP resource shares: errors rendered as CoAP responses with a
diagnostic payload, bounded block-wise reassembly, and content-format checks.

aiocoap reassembles Block1 requests for a resource without any bound on the size or the
number of transfers; `BoundedResource` replaces that spool with one that refuses a transfer
(4.13 with Size1) as soon as it would exceed the resource's limit.
"""

from __future__ import annotations

import aiocoap
import aiocoap.error
import aiocoap.resource
from aiocoap.blockwise import Block1Spool
from aiocoap.numbers import ContentFormat
from aiocoap.numbers.codes import Code

from twin.errors import (
    CitytwinError,
    NotAcceptable,
    RetryLater,
    UnsupportedContentFormat,
    coap_code,
)
from twin.failures import as_service_error

TEXT_PLAIN = ContentFormat(0)
# Concurrent block-wise uploads one resource keeps; more are refused until some finish.
MAX_OPEN_TRANSFERS = 1000


def error_response(error: CitytwinError) -> aiocoap.Message:
    """The CoAP response reporting `error`: its code, the message as a diagnostic payload
    (RFC 7252 5.5.2) and, for errors that say when to retry, Max-Age."""
    response = aiocoap.Message(
        code=coap_code(error), payload=str(error).encode(), content_format=TEXT_PLAIN
    )
    if isinstance(error, RetryLater):
        response.opt.max_age = error.retry_after_seconds
    return response


class _TooLarge(aiocoap.error.ConstructionRenderableError):  # type: ignore[misc]
    code = Code.REQUEST_ENTITY_TOO_LARGE

    def __init__(self, limit: int) -> None:
        super().__init__(f"request body is larger than the {limit} bytes allowed here")
        self.limit = limit

    def to_message(self) -> aiocoap.Message:
        message: aiocoap.Message = super().to_message()
        message.opt.size1 = self.limit
        return message


class _Busy(aiocoap.error.ConstructionRenderableError):  # type: ignore[misc]
    code = Code.SERVICE_UNAVAILABLE
    message = "too many block-wise transfers in progress; retry later"


class BoundedBlock1Spool(Block1Spool):  # type: ignore[misc]
    """aiocoap's Block1 reassembly with a cap on the reassembled size and on the number of
    transfers in progress."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__()
        self.max_bytes = max_bytes

    def feed_and_take(self, req: aiocoap.Message) -> aiocoap.Message:
        """Reassemble `req` into its transfer, or refuse it (4.13, 5.03)."""
        block1 = req.opt.block1
        if block1 is None:
            return req
        announced = req.opt.size1
        if (announced is not None and announced > self.max_bytes) or (
            block1.start + len(req.payload) > self.max_bytes
        ):
            raise _TooLarge(self.max_bytes)
        if block1.block_number == 0 and len(self._assemblies._items) >= MAX_OPEN_TRANSFERS:
            raise _Busy()
        taken: aiocoap.Message = super().feed_and_take(req)
        return taken


class BoundedResource(aiocoap.resource.Resource):  # type: ignore[misc]
    """A resource whose request bodies, block-wise or not, are at most `max_body_bytes`, and
    whose handlers may raise CitytwinError to answer with the matching CoAP error."""

    def __init__(self, max_body_bytes: int) -> None:
        super().__init__()
        self.max_body_bytes = max_body_bytes
        self._block1 = BoundedBlock1Spool(max_body_bytes)

    async def render(self, request: aiocoap.Message) -> aiocoap.Message:
        """Dispatch like aiocoap's Resource, turning CitytwinError into its CoAP response."""
        if len(request.payload) > self.max_body_bytes:
            return _TooLarge(self.max_body_bytes).to_message()
        try:
            response: aiocoap.Message = await super().render(request)
        except aiocoap.error.RenderableError:
            raise  # aiocoap's own answers, such as 4.05 Method Not Allowed
        except Exception as failure:
            path = "/" + "/".join(request.opt.uri_path)
            return error_response(as_service_error(failure, path))
        return response


def require_content_format(request: aiocoap.Message, *accepted: int) -> int:
    """The request's content-format if it is one of `accepted`, else 4.15 naming them."""
    given = request.opt.content_format
    if given is None or int(given) not in accepted:
        names = ", ".join(str(f) for f in accepted)
        shown = "none" if given is None else str(int(given))
        raise UnsupportedContentFormat(f"content-format {shown} is not accepted here (use {names})")
    return int(given)


def negotiate_accept(request: aiocoap.Message, default: int, *offered: int) -> int:
    """The content-format to answer in: the Accept option's if offered, `default` without
    one, else 4.06."""
    accept = request.opt.accept
    if accept is None:
        return default
    if int(accept) not in (default, *offered):
        names = ", ".join(str(f) for f in (default, *offered))
        raise NotAcceptable(f"cannot answer in content-format {int(accept)} (offered: {names})")
    return int(accept)
