"""Talking to a citytwin server from the command line: connection options, the channel with
its bearer token, and the one place where gRPC errors become an exit code."""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import grpc

from citytwin.v1 import (
    alarms_pb2_grpc,
    devices_pb2_grpc,
    firmware_pb2_grpc,
    provisioning_pb2_grpc,
    twins_pb2_grpc,
)
from twin.errors import InvalidArgument, Unauthenticated

DEFAULT_ADDRESS = "127.0.0.1:50051"
# Unary calls only; a watch stream runs until it is stopped.
CALL_TIMEOUT_SECONDS = 30.0
EXIT_RPC_ERROR = 2

Request = TypeVar("Request")
Response = TypeVar("Response")


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `--address`, `--token` and `--tls-ca` to an API command."""
    group = parser.add_argument_group("connection")
    group.add_argument(
        "--address",
        default=os.environ.get("CITYTWIN_ADDRESS") or DEFAULT_ADDRESS,
        help="server host:port (env CITYTWIN_ADDRESS, default %(default)s)",
    )
    group.add_argument(
        "--token",
        default=os.environ.get("CITYTWIN_TOKEN") or None,
        help="API bearer token (env CITYTWIN_TOKEN)",
    )
    group.add_argument(
        "--tls-ca",
        metavar="FILE",
        type=Path,
        default=None,
        help="PEM root certificate to verify the server with (TLS); plaintext if absent",
    )


def device_name(text: str) -> str:
    """The resource name `devices/{id}` of `ID`, `devices/ID` or `devices/ID/twin`."""
    text = text.strip().removesuffix("/twin")
    device_id = text.removeprefix("devices/")
    if not device_id or "/" in device_id:
        raise InvalidArgument(f"not a device id or name: {text!r}")
    return f"devices/{device_id}"


class ApiClient:
    """A channel to the server with typed stubs; every call carries the bearer token."""

    def __init__(self, address: str, token: str | None, tls_ca: Path | None = None) -> None:
        if not token:
            raise Unauthenticated("no API token: pass --token or set CITYTWIN_TOKEN")
        if tls_ca is None:
            self.channel = grpc.insecure_channel(address)
        else:
            try:
                root = tls_ca.read_bytes()
            except OSError as error:
                raise InvalidArgument(f"cannot read --tls-ca {tls_ca}: {error}") from error
            credentials = grpc.ssl_channel_credentials(root_certificates=root)
            self.channel = grpc.secure_channel(address, credentials)
        self.metadata = (("authorization", f"Bearer {token}"),)
        self.devices = devices_pb2_grpc.DeviceServiceStub(self.channel)
        self.twins = twins_pb2_grpc.TwinServiceStub(self.channel)
        self.alarms = alarms_pb2_grpc.AlarmServiceStub(self.channel)
        self.provisioning = provisioning_pb2_grpc.ProvisioningServiceStub(self.channel)
        self.firmware = firmware_pb2_grpc.FirmwareServiceStub(self.channel)
        self.campaigns = firmware_pb2_grpc.CampaignServiceStub(self.channel)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ApiClient:
        """A client configured by the connection options of `add_connection_arguments`."""
        return cls(args.address, args.token, args.tls_ca)

    def call(
        self, method: grpc.UnaryUnaryMultiCallable[Request, Response], request: Request
    ) -> Response:
        """Call a unary method with the token and a deadline."""
        return method(request, metadata=self.metadata, timeout=CALL_TIMEOUT_SECONDS)

    def stream(
        self, method: grpc.UnaryStreamMultiCallable[Request, Response], request: Request
    ) -> grpc.CallIterator[Response]:
        """Start a server-streaming call with the token and no deadline."""
        return method(request, metadata=self.metadata)

    def close(self) -> None:
        """Close the channel."""
        self.channel.close()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def report_rpc_error(error: grpc.RpcError) -> int:
    """Print a failed call as `citytwin: STATUS: details` and return the exit code."""
    code = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = (error.details() if isinstance(error, grpc.Call) else None) or str(error)
    print(f"citytwin: {code.name}: {details}", file=sys.stderr)
    return EXIT_RPC_ERROR


def api_command(
    work: Callable[[argparse.Namespace, ApiClient], int],
) -> Callable[[argparse.Namespace], int]:
    """Turn `work(args, api)` into a sub-command `func`: it gets a connected client and a
    failed call ends it with a one-line message instead of a traceback."""

    @functools.wraps(work)
    def run(args: argparse.Namespace) -> int:
        with ApiClient.from_args(args) as api:
            try:
                return work(args, api)
            except grpc.RpcError as error:
                return report_rpc_error(error)

    return run


def add_api_command(sub: Any, name: str, help_text: str) -> argparse.ArgumentParser:
    """Add an API sub-command with `--json` and the connection options."""
    parser: argparse.ArgumentParser = sub.add_parser(name, help=help_text)
    parser.add_argument("--json", action="store_true", help="print JSON")
    add_connection_arguments(parser)
    return parser


def follow(call: grpc.CallIterator[Response], show: Callable[[Response], None], limit: int) -> int:
    """Show each message of a server stream until `limit` (0: no limit), Ctrl-C or a closed
    pipe, then end the call; returns the exit code (0)."""
    seen = 0
    try:
        for message in call:
            show(message)
            seen += 1
            if seen == limit:
                break
    except KeyboardInterrupt:
        # Ctrl-C is how a person stops watching, not a failure.
        pass
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, and keep the interpreter's final
        # flush of stdout from failing again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    finally:
        # Stops the server-side stream at once; grpc-stubs leaves RpcContext.cancel untyped.
        call.cancel()  # type: ignore[no-untyped-call]
    return 0
