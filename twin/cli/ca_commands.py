"""`citytwin ca ...`: the fleet certificate authority, managed directly in the database."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from provisioning.ca_store import ca_passphrase, ca_summary, ensure_ca, import_ca
from provisioning.server_identity import issue_server_identity
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


def _write_private(path: Path, data: bytes) -> None:
    # 0600 from the start: a key must never be readable by others, not even for a moment.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def _issue_server_cert(args: argparse.Namespace) -> int:
    settings = load_settings()
    passphrase = ca_passphrase(settings.home, settings.ca_passphrase)
    ca = with_database(lambda: ensure_ca(passphrase))
    identity = issue_server_identity(ca, args.name, args.days)
    try:
        Path(args.cert_out).write_bytes(identity.chain_pem)
        _write_private(Path(args.key_out), identity.key_pem)
    except OSError as error:
        raise InvalidArgument(f"cannot write {error.filename}: {error.strerror}") from None
    print(f"wrote {args.cert_out} (certificate and issuing CA) and {args.key_out} (key, 0600)")
    return 0


def register(commands: Any) -> None:
    """Add `ca show|import|issue-server-cert`."""
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
    issue = sub.add_parser(
        "issue-server-cert",
        help="issue a TLS server certificate (e.g. for gRPC: CITYTWIN_TLS_CERT/KEY) from the CA",
    )
    issue.add_argument(
        "--name", action="append", required=True, help="DNS name or IP address (repeatable)"
    )
    issue.add_argument("--cert-out", required=True, metavar="PEM", help="certificate chain file")
    issue.add_argument("--key-out", required=True, metavar="PEM", help="private key file (0600)")
    issue.add_argument("--days", type=int, default=365, help="validity (default %(default)s)")
    issue.set_defaults(func=_issue_server_cert)
