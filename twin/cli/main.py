"""The `citytwin` command: run the service, and talk to it as a person.

Each command group lives in its own module and registers its sub-commands here.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Sequence
from typing import Any

from twin.cli import (
    api_commands,
    ca_commands,
    campaign_commands,
    firmware_commands,
    token_commands,
)
from twin.errors import CitytwinError
from twin.logs import configure_logging
from twin.settings import load_settings


def _serve(args: argparse.Namespace) -> int:
    from twin.server import serve

    settings = load_settings()
    configure_logging(settings.log_level)
    print(
        f"citytwin: gRPC on {settings.grpc_address}, CoAP on udp/{settings.coap_port}, "
        f"data in {settings.db_url.split('@')[-1]}",
        file=sys.stderr,
        flush=True,
    )
    asyncio.run(serve(settings))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    parser = argparse.ArgumentParser(
        prog="citytwin", description="Device management and digital twins for a smart city."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser("serve", help="run the service (configured by CITYTWIN_* env)")
    serve.set_defaults(func=_serve)
    token_commands.register(commands)
    ca_commands.register(commands)
    api_commands.register(commands)
    firmware_commands.register(commands)
    campaign_commands.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `citytwin` console script."""
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], Any] = args.func
    try:
        return int(func(args) or 0)
    except CitytwinError as error:
        print(f"citytwin: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
