"""`citytwin keys|firmware`: what a release engineer needs before a rollout. Admins register
the release keys firmware must be signed with (`keys`); release engineers upload signed images
(`firmware upload`, streamed in chunks with a progress bar) and look after the stored ones.
Campaigns that roll an artifact out are in `campaign_commands`."""

from __future__ import annotations

import argparse
import hashlib
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from google.protobuf.message import Message
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from citytwin.v1 import firmware_pb2 as f
from twin.cli.api_client import ApiClient, add_api_command, api_command
from twin.cli.device_commands import KINDS
from twin.cli.output import (
    message_to_dict,
    print_json,
    short_name,
    show,
    show_all,
    time_of,
)
from twin.cli.provisioning_commands import collect
from twin.errors import InvalidArgument

# Well below the service's 1 MiB per message, and small enough for a smooth progress bar.
CHUNK_BYTES = 64 * 1024
KEY_COLUMNS = ["id", "algorithm", "name", "created"]
ARTIFACT_COLUMNS = ["sha256", "name", "version", "format", "size", "kinds", "created"]
_SHA256 = re.compile(r"[0-9a-f]{64}")


# --- names, stubs and shared output --------------------------------------------------------


def resource_name(
    collection: str, text: str, what: str, pattern: re.Pattern[str], *, fold_case: bool = False
) -> str:
    """`{collection}/{id}` for `ID` or `{collection}/ID`; InvalidArgument unless the id
    matches `pattern` (`what` names it in the message). `fold_case` lowercases the id."""
    ident = text.strip().removeprefix(f"{collection}/")
    if fold_case:
        # Hex digests copied from other tools (sha256sum on some systems) come in upper case.
        ident = ident.lower()
    if not pattern.fullmatch(ident):
        raise InvalidArgument(f"not {what} or {collection}/ID: {text!r}")
    return f"{collection}/{ident}"


def key_name(text: str) -> str:
    """`releaseKeys/{key_id}` for a key id (64 hex digits) or `releaseKeys/ID`."""
    return resource_name("releaseKeys", text, "a release key id", _SHA256, fold_case=True)


def artifact_name(text: str) -> str:
    """`artifacts/{sha256}` for a SHA-256 (64 hex digits) or `artifacts/SHA`."""
    return resource_name("artifacts", text, "an artifact's SHA-256", _SHA256, fold_case=True)


def print_deleted(name: str, response: Message, as_json: bool) -> None:
    """Confirm a deletion."""
    if as_json:
        print_json(message_to_dict(response))
    else:
        print(f"deleted {name}")


def _read(path: Path, option: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise InvalidArgument(f"cannot read {option} ({error.strerror}): {path}") from None


def comma_list(text: str) -> list[str]:
    """`a,b, c` as a list, empty items dropped."""
    return [item.strip() for item in text.split(",") if item.strip()]


def device_kinds(text: str) -> list[str]:
    """A comma-separated list of device kinds (`lamp,sensor`)."""
    kinds = comma_list(text)
    unknown = [kind for kind in kinds if kind not in KINDS]
    if unknown:
        # The service stores any name; a typo would make every device "incompatible".
        raise argparse.ArgumentTypeError(
            f"unknown device kind {unknown[0]!r}; choose from {', '.join(sorted(KINDS))}"
        )
    return kinds


# --- release keys ---------------------------------------------------------------------------


def key_fields(key: f.ReleaseKey) -> dict[str, str]:
    """A release key's fields for people (the PEM only in JSON)."""
    return {
        "id": key.key_id,
        "algorithm": f.KeyAlgorithm.Name(key.algorithm).removeprefix("KEY_ALGORITHM_").lower(),
        "name": key.display_name,
        "created": time_of(key, "create_time"),
    }


@api_command
def _keys_add(args: argparse.Namespace, api: ApiClient) -> int:
    path = Path(args.file)
    request = f.CreateReleaseKeyRequest(
        public_key=_read(path, "the key file"),
        display_name=path.name if args.name is None else args.name,
    )
    key = api.call(api.firmware.CreateReleaseKey, request)
    show(key, key_fields(key), args.json)
    return 0


@api_command
def _keys_list(args: argparse.Namespace, api: ApiClient) -> int:
    def fetch(size: int, token: str) -> tuple[Iterable[f.ReleaseKey], str]:
        request = f.ListReleaseKeysRequest(page_size=size, page_token=token)
        response = api.call(api.firmware.ListReleaseKeys, request)
        return response.release_keys, response.next_page_token

    # Release keys are few: always the whole list.
    keys, _ = collect(fetch, every=True)
    show_all(keys, key_fields, KEY_COLUMNS, args.json)
    return 0


@api_command
def _keys_delete(args: argparse.Namespace, api: ApiClient) -> int:
    name = key_name(args.key)
    response = api.call(api.firmware.DeleteReleaseKey, f.DeleteReleaseKeyRequest(name=name))
    print_deleted(name, response, args.json)
    return 0


# --- artifacts ------------------------------------------------------------------------------


def artifact_fields(artifact: f.Artifact) -> dict[str, str]:
    """An artifact's fields for people (the detached signature only in JSON)."""
    return {
        "sha256": artifact.sha256,
        "name": artifact.display_name,
        "version": artifact.version,
        "format": f.ArtifactFormat.Name(artifact.format).removeprefix("ARTIFACT_FORMAT_").lower(),
        "size": str(artifact.size_bytes),
        "kinds": ",".join(artifact.compatible_kinds),
        "models": ",".join(artifact.compatible_models),
        "min from": artifact.minimum_from_version,
        "signer": short_name(artifact.signing_key),
        "security counter": str(artifact.security_counter),
        "created": time_of(artifact, "create_time"),
        "uploaded by": artifact.uploaded_by,
        "notes": artifact.release_notes,
    }


def file_digest(path: Path) -> tuple[int, str]:
    """The size and lowercase hex SHA-256 of a file, announced before its bytes are sent."""
    try:
        with path.open("rb") as image:
            digest = hashlib.file_digest(image, "sha256").hexdigest()
            return image.tell(), digest
    except OSError as error:
        raise InvalidArgument(f"cannot read the image ({error.strerror}): {path}") from None


def upload_requests(
    metadata: f.ArtifactMetadata, path: Path, sent: Callable[[int], None]
) -> Iterator[f.UploadArtifactRequest]:
    """The upload stream: the metadata, then the file in `CHUNK_BYTES` chunks; `sent` is told
    the size of each chunk as it goes."""
    yield f.UploadArtifactRequest(metadata=metadata)
    with path.open("rb") as image:
        while chunk := image.read(CHUNK_BYTES):
            yield f.UploadArtifactRequest(chunk=chunk)
            sent(len(chunk))


@contextmanager
def upload_progress(label: str, size: int, visible: bool) -> Iterator[Callable[[int], None]]:
    """A progress bar of `size` bytes while the block runs, if `visible`; yields the function
    to call with the size of each chunk sent."""
    if not visible:
        yield lambda _: None
        return
    columns = (BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(TextColumn("{task.description}"), *columns) as progress:
        task = progress.add_task(label, total=size)
        done = 0

        def sent(length: int) -> None:
            nonlocal done
            done += length
            # The service checks the signature only once it has every byte.
            progress.update(task, completed=done, description=label if done < size else "verifying")

        yield sent


def _release_notes(args: argparse.Namespace) -> str:
    if args.notes_file is None:
        return str(args.notes)
    try:
        return Path(args.notes_file).read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise InvalidArgument(f"cannot read --notes-file {args.notes_file}: {error}") from None


@api_command
def _upload(args: argparse.Namespace, api: ApiClient) -> int:
    path = Path(args.file)
    size, digest = file_digest(path)
    metadata = f.ArtifactMetadata(
        display_name=args.name,
        version=args.version,
        size_bytes=size,
        sha256=digest,
        compatible_kinds=args.kinds,
        compatible_models=args.models,
        minimum_from_version=args.min_from,
        release_notes=_release_notes(args),
        signature=_read(Path(args.signature), "--signature") if args.signature else b"",
    )
    visible = Console().is_terminal and not args.json
    with upload_progress(f"uploading {path.name}", size, visible) as sent:
        # No deadline: an upload takes as long as the image and the link make it.
        artifact = api.firmware.UploadArtifact(
            upload_requests(metadata, path, sent), metadata=api.metadata
        )
    show(artifact, artifact_fields(artifact), args.json)
    return 0


@api_command
def _list(args: argparse.Namespace, api: ApiClient) -> int:
    def fetch(size: int, token: str) -> tuple[Iterable[f.Artifact], str]:
        request = f.ListArtifactsRequest(page_size=size, page_token=token)
        response = api.call(api.firmware.ListArtifacts, request)
        return response.artifacts, response.next_page_token

    artifacts, _ = collect(fetch, every=True)
    show_all(artifacts, artifact_fields, ARTIFACT_COLUMNS, args.json)
    return 0


@api_command
def _show(args: argparse.Namespace, api: ApiClient) -> int:
    request = f.GetArtifactRequest(name=artifact_name(args.artifact))
    artifact = api.call(api.firmware.GetArtifact, request)
    show(artifact, artifact_fields(artifact), args.json)
    return 0


@api_command
def _delete(args: argparse.Namespace, api: ApiClient) -> int:
    name = artifact_name(args.artifact)
    response = api.call(api.firmware.DeleteArtifact, f.DeleteArtifactRequest(name=name))
    print_deleted(name, response, args.json)
    return 0


# --- registration ---------------------------------------------------------------------------


def _register_keys(commands: Any) -> None:
    keys = commands.add_parser("keys", help="release keys firmware must be signed with")
    sub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")

    add = add_api_command(sub, "add", "trust a release key (admins)")
    add.add_argument(
        "file", metavar="FILE", help="public key, PEM or DER, or an imgtool private key file"
    )
    add.add_argument("--name", metavar="TEXT", help="what the key is for (default: file name)")
    add.set_defaults(func=_keys_add)

    listing = add_api_command(sub, "list", "list release keys, oldest first")
    listing.set_defaults(func=_keys_list)

    delete = add_api_command(sub, "delete", "stop trusting a release key for new uploads")
    delete.add_argument("key", metavar="KEY_ID", help="key id or releaseKeys/ID")
    delete.set_defaults(func=_keys_delete)


def _register_firmware(commands: Any) -> None:
    firmware = commands.add_parser("firmware", help="signed firmware artifacts")
    sub = firmware.add_subparsers(dest="firmware_command", required=True, metavar="ACTION")

    upload = add_api_command(sub, "upload", "upload a signed image")
    upload.add_argument(
        "file", metavar="FILE", help="an imgtool-signed MCUboot image, or any binary"
    )
    upload.add_argument("--name", required=True, help="e.g. lamp-controller")
    upload.add_argument(
        "--version", default="", metavar="V", help="semantic version (MCUboot: from the header)"
    )
    upload.add_argument(
        "--signature", metavar="SIGFILE", help="detached signature over a binary image"
    )
    upload.add_argument(
        "--kinds", type=device_kinds, default=[], metavar="KIND,...", help="default: any kind"
    )
    upload.add_argument(
        "--models", type=comma_list, default=[], metavar="MODEL,...", help="default: any model"
    )
    upload.add_argument(
        "--min-from", default="", metavar="V", help="oldest version it may upgrade from"
    )
    notes = upload.add_mutually_exclusive_group()
    notes.add_argument("--notes", default="", metavar="TEXT", help="release notes")
    notes.add_argument("--notes-file", metavar="F", help="release notes from a file")
    upload.set_defaults(func=_upload)

    listing = add_api_command(sub, "list", "list artifacts, newest first")
    listing.set_defaults(func=_list)

    for action, help_text, func in (
        ("show", "show one artifact", _show),
        ("delete", "delete an artifact no campaign refers to", _delete),
    ):
        command = add_api_command(sub, action, help_text)
        command.add_argument("artifact", metavar="SHA256", help="SHA-256 or artifacts/SHA256")
        command.set_defaults(func=func)


def register(commands: Any) -> None:
    """Add `keys add|list|delete` and `firmware upload|list|show|delete`."""
    _register_keys(commands)
    _register_firmware(commands)
