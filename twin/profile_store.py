"""Looking up device profiles: built-in ones from code, custom ones from the database."""

from __future__ import annotations

from datetime import UTC, datetime

from tortoise.exceptions import IntegrityError

from twin.builtin_profiles import BUILTIN_PROFILES, builtin_profile
from twin.errors import AlreadyExists, NotFound
from twin.models import CustomProfile
from twin.profiles import Profile, check_profile, profile_from_dict, profile_to_dict


async def get_profile(model: str) -> Profile:
    """The profile of `model`; NotFound if there is none."""
    profile = builtin_profile(model)
    if profile is not None:
        return profile
    row = await CustomProfile.get_or_none(model=model)
    if row is None:
        raise NotFound(f"no device profile for model {model!r}")
    return profile_from_dict(row.spec)


async def list_profiles() -> list[Profile]:
    """Built-in profiles, then custom ones by model."""
    custom = [profile_from_dict(r.spec) for r in await CustomProfile.all().order_by("model")]
    return [*BUILTIN_PROFILES, *custom]


async def create_profile(profile: Profile) -> Profile:
    """Register a custom profile; AlreadyExists if the model has one (built-in or custom)."""
    check_profile(profile)
    if builtin_profile(profile.model) is not None:
        raise AlreadyExists(f"model {profile.model!r} has a built-in profile")
    try:
        await CustomProfile.create(
            model=profile.model,
            spec=profile_to_dict(profile),
            created_at=datetime.now(UTC),
        )
    except IntegrityError:
        raise AlreadyExists(f"model {profile.model!r} already has a profile") from None
    return profile
