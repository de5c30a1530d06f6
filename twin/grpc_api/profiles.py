"""gRPC ProfileService: decode, call the profile store, encode."""

from __future__ import annotations

from typing import Any

from citytwin.v1 import profiles_pb2, profiles_pb2_grpc
from twin import profile_store
from twin.grpc_api.convert import model_from_profile_name, profile_from_proto, profile_to_proto


class ProfileServicer(profiles_pb2_grpc.ProfileServiceServicer):
    """Device profiles over gRPC."""

    async def GetProfile(
        self, request: profiles_pb2.GetProfileRequest, context: Any
    ) -> profiles_pb2.DeviceProfile:
        model = model_from_profile_name(request.name)
        return profile_to_proto(await profile_store.get_profile(model))

    async def ListProfiles(
        self, request: profiles_pb2.ListProfilesRequest, context: Any
    ) -> profiles_pb2.ListProfilesResponse:
        profiles = await profile_store.list_profiles()
        return profiles_pb2.ListProfilesResponse(profiles=[profile_to_proto(p) for p in profiles])

    async def CreateProfile(
        self, request: profiles_pb2.CreateProfileRequest, context: Any
    ) -> profiles_pb2.DeviceProfile:
        profile = profile_from_proto(request.profile)
        return profile_to_proto(await profile_store.create_profile(profile))
