"""The HrFlow API client: typed errors, a shared rate budget, the profile model and transform."""

from hrflow_webhooks.client.api import HrflowClient, MissingCredentialsError
from hrflow_webhooks.client.errors import (
    ApiError,
    BadRequest,
    NotFound,
    RateLimited,
    RejectedRequest,
    Unauthorized,
    UpstreamError,
)
from hrflow_webhooks.client.profiles import Profile, ProfileWrite, profile_to_indexing_payload
from hrflow_webhooks.client.rate import RateBudget

__all__ = [
    "ApiError",
    "BadRequest",
    "HrflowClient",
    "MissingCredentialsError",
    "NotFound",
    "Profile",
    "ProfileWrite",
    "RateBudget",
    "RateLimited",
    "RejectedRequest",
    "Unauthorized",
    "UpstreamError",
    "profile_to_indexing_payload",
]
