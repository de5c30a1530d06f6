"""`citytwin ca ...`: the fleet certificate authority, managed directly in the database."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from provisioning.ca_store import ca_passphrase, ca_summary, import_ca
from twin.cli.local_database import with_database
from twin.cli.output import print_key_values
from twin.errors import InvalidArgument
from twin.settings import load_settings


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise InvalidArgument(f"cannot read the {what} ({error.strerror}): {path}") from None


def _show(args: argparse.Namespace) -> int:
    summary = with_database(ca_summary)
    if args.pem:
        print(summary.chain_pem.decode(), end="")
        return 0
    record: dict[str, Any] = {
        "source": summary.source,
        "created": summary.created_at.isoformat(),
        "root": summary.root_subject,
        "root sha256": summary.root_sha256,
        "issuing": summary.issuing_subject,
        "issuing sha256": summary.issuing_sha256,
        "issuing expires": summary.issuing_not_after.isoformat(),
    }
    if args.json:
        print(json.dumps(record, indent=2))
    else:
        print_key_values(list(record.items()))
    return 0


def _import(args: argparse.Namespace) -> int:
    key_passphrase = os.environ.get(args.key_passphrase_env, "").encode() or None
    settings = load_settings()
    root, issuing = _read(args.root, "root certificate"), _read(args.issuing, "issuing certificate")
    key = _read(args.key, "issuing CA key")
    ca = with_database(
        lambda: import_ca(
            root, issuing, key, key_passphrase, ca_passphrase(settings.home, settings.ca_passphrase)
        )
    )
    print(f"imported {ca.issuing_cert.subject.rfc4514_string()}")
    return 0


def register(commands: Any) -> None:
    """Add `ca show|import`."""
    ca = commands.add_parser("ca", help="the fleet certificate authority")
    sub = ca.add_subparsers(dest="ca_command", required=True, metavar="ACTION")
    show = sub.add_parser("show", help="show the CA certificates and their fingerprints")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.add_argument("--pem", action="store_true", help="print the chain (issuing, root) as PEM")
    show.set_defaults(func=_show)
    imp = sub.add_parser(
        "import", help="adopt an existing CA (only before the service first starts)"
    )
    imp.add_argument("--root", required=True, metavar="PEM", help="root CA certificate")
    imp.add_argument("--issuing", required=True, metavar="PEM", help="issuing CA certificate")
    imp.add_argument("--key", required=True, metavar="PEM", help="issuing CA private key")
    imp.add_argument(
        "--key-passphrase-env",
        default="CITYTWIN_IMPORT_KEY_PASSPHRASE",
        metavar="VAR",
        help="environment variable holding the key file's passphrase, if it is encrypted",
    )
    imp.set_defaults(func=_import)
