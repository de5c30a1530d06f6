"""The error hierarchy of citytwin, and its one mapping to gRPC status codes and CoAP codes.

Domain code raises these types; only the edges (gRPC servicers, CoAP resources) translate
them, through `grpc_status` and `coap_code`, so a given problem gets the same answer on every
face of the service.
"""

from __future__ import annotations

import grpc
from aiocoap.numbers.codes import Code


class CitytwinError(Exception):
    """Base of every error the service reports to a caller; the message is shown to them."""


class InvalidArgument(CitytwinError):
    """The request is malformed or breaks a rule, independent of the current state."""


class ProfileViolation(InvalidArgument):
    """A twin document would break its device profile at `path`."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class SelectorError(InvalidArgument):
    """A selector cannot be parsed or names an unknown key."""


class PayloadTooLarge(InvalidArgument):
    """A payload exceeds its size or depth bound."""


class UnsupportedContentFormat(InvalidArgument):
    """A request body comes in a content-format the resource does not take."""


class NotAcceptable(InvalidArgument):
    """The caller asks for a representation (CoAP Accept) the resource does not offer."""


class ArtifactRejected(InvalidArgument):
    """A firmware artifact, its signature or its manifest is malformed, tampered with, or not
    signed by a trusted release key; the message says which."""


class NotFound(CitytwinError):
    """The named resource does not exist (or the caller may not know it does)."""


class AlreadyExists(CitytwinError):
    """A resource with that name or unique key exists already."""


class VersionConflict(CitytwinError):
    """An optimistic-concurrency check failed: the resource changed since it was read."""


class FailedPrecondition(CitytwinError):
    """The resource is not in a state that allows the operation (e.g. decommissioned)."""


class OutOfRange(CitytwinError):
    """A position (such as a change-feed cursor) lies outside what is kept."""


class Unauthenticated(CitytwinError):
    """No credentials, or credentials the service does not accept."""


class PermissionDenied(CitytwinError):
    """The caller is known but may not do this, or not to this device."""


class RetryLater(CitytwinError):
    """Base of errors that tell the caller when to try again (CoAP Max-Age)."""

    def __init__(self, message: str, retry_after_seconds: int) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds


class ResourceExhausted(RetryLater):
    """A rate or capacity limit is reached; retry after `retry_after_seconds`."""


class AwaitingApproval(RetryLater):
    """The request is valid but waits for something an operator does (e.g. registering the
    device); retry after `retry_after_seconds`."""


class Unavailable(CitytwinError):
    """A dependency (the database) cannot be reached right now; retry later."""


# Most specific class first: lookups walk the exception's MRO.
_TABLE: dict[type[CitytwinError], tuple[grpc.StatusCode, Code]] = {
    PayloadTooLarge: (grpc.StatusCode.INVALID_ARGUMENT, Code.REQUEST_ENTITY_TOO_LARGE),
    ProfileViolation: (grpc.StatusCode.INVALID_ARGUMENT, Code.UNPROCESSABLE_ENTITY),
    UnsupportedContentFormat: (
        grpc.StatusCode.INVALID_ARGUMENT,
        Code.UNSUPPORTED_CONTENT_FORMAT,
    ),
    NotAcceptable: (grpc.StatusCode.INVALID_ARGUMENT, Code.NOT_ACCEPTABLE),
    InvalidArgument: (grpc.StatusCode.INVALID_ARGUMENT, Code.BAD_REQUEST),
    NotFound: (grpc.StatusCode.NOT_FOUND, Code.NOT_FOUND),
    AlreadyExists: (grpc.StatusCode.ALREADY_EXISTS, Code.CONFLICT),
    VersionConflict: (grpc.StatusCode.ABORTED, Code.PRECONDITION_FAILED),
    FailedPrecondition: (grpc.StatusCode.FAILED_PRECONDITION, Code.CONFLICT),
    OutOfRange: (grpc.StatusCode.OUT_OF_RANGE, Code.BAD_REQUEST),
    Unauthenticated: (grpc.StatusCode.UNAUTHENTICATED, Code.UNAUTHORIZED),
    PermissionDenied: (grpc.StatusCode.PERMISSION_DENIED, Code.FORBIDDEN),
    ResourceExhausted: (grpc.StatusCode.RESOURCE_EXHAUSTED, Code.TOO_MANY_REQUESTS),
    AwaitingApproval: (grpc.StatusCode.UNAVAILABLE, Code.SERVICE_UNAVAILABLE),
    Unavailable: (grpc.StatusCode.UNAVAILABLE, Code.SERVICE_UNAVAILABLE),
    CitytwinError: (grpc.StatusCode.INTERNAL, Code.INTERNAL_SERVER_ERROR),
}


def _lookup(error: CitytwinError) -> tuple[grpc.StatusCode, Code]:
    for cls in type(error).__mro__:
        if cls in _TABLE:
            return _TABLE[cls]
    raise TypeError(f"{type(error).__name__} is not a CitytwinError")  # pragma: no cover


def grpc_status(error: CitytwinError) -> grpc.StatusCode:
    """The gRPC status code that reports `error`."""
    return _lookup(error)[0]


def coap_code(error: CitytwinError) -> Code:
    """The CoAP response code that reports `error`."""
    return _lookup(error)[1]
