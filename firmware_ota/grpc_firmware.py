"""gRPC FirmwareService: release keys and artifacts (decode, call the store, encode)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from citytwin.v1 import firmware_pb2, firmware_pb2_grpc
from firmware_ota import artifact_store
from firmware_ota.artifact_acceptance import ArtifactFormat, UploadMetadata
from firmware_ota.artifact_store import ArtifactView, StoredKey, Uploads
from firmware_ota.campaign_store import actor_of
from firmware_ota.release_keys import KeyAlgorithm
from twin.errors import InvalidArgument
from twin.grpc_api.convert import timestamp
from twin.grpc_api.interceptor import current_principal

_ALGORITHMS = {
    KeyAlgorithm.ED25519: firmware_pb2.KEY_ALGORITHM_ED25519,
    KeyAlgorithm.ECDSA_P256: firmware_pb2.KEY_ALGORITHM_ECDSA_P256,
}
_FORMATS = {
    ArtifactFormat.MCUBOOT: firmware_pb2.ARTIFACT_FORMAT_MCUBOOT,
    ArtifactFormat.BINARY: firmware_pb2.ARTIFACT_FORMAT_BINARY,
}
_FORMATS_BACK = {v: k for k, v in _FORMATS.items()}
# A chunk message larger than this is refused (the proto says 1 MiB).
MAX_UPLOAD_CHUNK = 1024 * 1024


def name_id(name: str, collection: str) -> str:
    """The id in `{collection}/{id}`; InvalidArgument for another form."""
    prefix, _, ident = name.partition("/")
    if prefix != collection or not ident or "/" in ident:
        raise InvalidArgument(f"name {name!r} is not of the form {collection}/{{id}}")
    return ident


def key_to_proto(stored: StoredKey) -> firmware_pb2.ReleaseKey:
    """A release key as a message."""
    return firmware_pb2.ReleaseKey(
        name=f"releaseKeys/{stored.key.key_id}",
        key_id=stored.key.key_id,
        algorithm=_ALGORITHMS[stored.key.algorithm],
        public_key_pem=stored.key.public_key_pem(),
        display_name=stored.display_name,
        create_time=timestamp(stored.created_at),
    )


def artifact_to_proto(view: ArtifactView) -> firmware_pb2.Artifact:
    """An artifact as a message."""
    return firmware_pb2.Artifact(
        name=f"artifacts/{view.sha256}",
        sha256=view.sha256,
        display_name=view.display_name,
        version=view.version,
        format=_FORMATS[view.format],
        size_bytes=view.size,
        compatible_kinds=list(view.compatible_kinds),
        compatible_models=list(view.compatible_models),
        minimum_from_version=view.minimum_from_version,
        release_notes=view.release_notes,
        signing_key=f"releaseKeys/{view.signing_key_id}",
        security_counter=view.security_counter or 0,
        signature=view.signature,
        create_time=timestamp(view.created_at),
        uploaded_by=view.uploaded_by,
    )


def _metadata(message: firmware_pb2.ArtifactMetadata) -> UploadMetadata:
    return UploadMetadata(
        display_name=message.display_name,
        version=message.version,
        format=_FORMATS_BACK.get(message.format),
        size=message.size_bytes,
        sha256=message.sha256,
        compatible_kinds=tuple(message.compatible_kinds),
        compatible_models=tuple(message.compatible_models),
        minimum_from_version=message.minimum_from_version,
        release_notes=message.release_notes,
        signature=message.signature,
    )


async def _chunks(
    requests: AsyncIterator[firmware_pb2.UploadArtifactRequest],
) -> AsyncIterator[bytes]:
    async for request in requests:
        if request.WhichOneof("part") != "chunk":
            raise InvalidArgument("only the first message of an upload carries metadata")
        if len(request.chunk) > MAX_UPLOAD_CHUNK:
            raise InvalidArgument(f"an upload chunk may hold at most {MAX_UPLOAD_CHUNK} bytes")
        yield request.chunk


class FirmwareServicer(firmware_pb2_grpc.FirmwareServiceServicer):
    """Release keys and artifacts over gRPC."""

    def __init__(self, max_artifact_bytes: int) -> None:
        self._uploads = Uploads()
        self._max_artifact_bytes = max_artifact_bytes

    async def CreateReleaseKey(
        self, request: firmware_pb2.CreateReleaseKeyRequest, context: Any
    ) -> firmware_pb2.ReleaseKey:
        return key_to_proto(
            await artifact_store.add_release_key(request.public_key, request.display_name)
        )

    async def ListReleaseKeys(
        self, request: firmware_pb2.ListReleaseKeysRequest, context: Any
    ) -> firmware_pb2.ListReleaseKeysResponse:
        keys, token = await artifact_store.list_release_keys(request.page_size, request.page_token)
        return firmware_pb2.ListReleaseKeysResponse(
            release_keys=[key_to_proto(k) for k in keys], next_page_token=token
        )

    async def DeleteReleaseKey(
        self, request: firmware_pb2.DeleteReleaseKeyRequest, context: Any
    ) -> firmware_pb2.DeleteReleaseKeyResponse:
        await artifact_store.delete_release_key(name_id(request.name, "releaseKeys"))
        return firmware_pb2.DeleteReleaseKeyResponse()

    async def UploadArtifact(
        self, request_iterator: AsyncIterator[firmware_pb2.UploadArtifactRequest], context: Any
    ) -> firmware_pb2.Artifact:
        requests = aiter(request_iterator)
        first = await anext(requests, None)
        if first is None or first.WhichOneof("part") != "metadata":
            raise InvalidArgument("the first message of an upload must carry metadata")
        view = await self._uploads.store(
            _metadata(first.metadata),
            _chunks(requests),
            actor_of(current_principal()),
            self._max_artifact_bytes,
        )
        return artifact_to_proto(view)

    async def GetArtifact(
        self, request: firmware_pb2.GetArtifactRequest, context: Any
    ) -> firmware_pb2.Artifact:
        return artifact_to_proto(
            await artifact_store.get_artifact(name_id(request.name, "artifacts"))
        )

    async def ListArtifacts(
        self, request: firmware_pb2.ListArtifactsRequest, context: Any
    ) -> firmware_pb2.ListArtifactsResponse:
        views, token = await artifact_store.list_artifacts(request.page_size, request.page_token)
        return firmware_pb2.ListArtifactsResponse(
            artifacts=[artifact_to_proto(v) for v in views], next_page_token=token
        )

    async def DeleteArtifact(
        self, request: firmware_pb2.DeleteArtifactRequest, context: Any
    ) -> firmware_pb2.DeleteArtifactResponse:
        await artifact_store.delete_artifact(name_id(request.name, "artifacts"))
        return firmware_pb2.DeleteArtifactResponse()
