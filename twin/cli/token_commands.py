"""`citytwin token ...`: API tokens, managed directly in the database (the first admin
token cannot be asked of an API that needs a token)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from twin import tokens
from twin.access import TOKEN_ROLES, parse_role
from twin.cli.local_database import with_database


def _create(args: argparse.Namespace) -> int:
    role = parse_role(args.role)
    token = with_database(lambda: tokens.create_token(role, args.scope, args.description))
    print(token)
    return 0


def _list(args: argparse.Namespace) -> int:
    rows = with_database(tokens.list_tokens)
    records = [
        {
            "id": r.id,
            "role": r.role,
            "scope": r.scope,
            "description": r.description,
            "created": r.created_at.isoformat(),
            "revoked": r.revoked_at.isoformat() if r.revoked_at else "",
        }
        for r in rows
    ]
    if args.json:
        print(json.dumps(records, indent=2))
    else:
        from twin.cli.output import print_table

        print_table(records, ["id", "role", "scope", "description", "created", "revoked"])
    return 0


def _revoke(args: argparse.Namespace) -> int:
    if not with_database(lambda: tokens.revoke_token(args.id)):
        print(f"citytwin: no live token with id {args.id}")
        return 1
    return 0


def register(commands: Any) -> None:
    """Add `token create|list|revoke`."""
    token = commands.add_parser("token", help="manage API bearer tokens")
    sub = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    create = sub.add_parser("create", help="create a token and print it (shown only once)")
    create.add_argument("--role", required=True, help=", ".join(r.value for r in TOKEN_ROLES))
    create.add_argument("--scope", default="", help="selector limiting the devices it reaches")
    create.add_argument("--description", default="", help="who or what the token is for")
    create.set_defaults(func=_create)
    listing = sub.add_parser("list", help="list tokens (never their secrets)")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(func=_list)
    revoke = sub.add_parser("revoke", help="revoke a token by id")
    revoke.add_argument("id", type=int)
    revoke.set_defaults(func=_revoke)
