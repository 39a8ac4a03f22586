"""The HrFlow API client: typed errors, a rate budget it waits on, the profile model and transform.

A library of its own: it takes an aiohttp session, credentials and a budget, and
knows nothing of the service's settings or Redis (``workers.client`` wires it).
"""

from hrflow_client.api import HrflowClient, ProfilePage
from hrflow_client.errors import (
    ApiError,
    BadRequest,
    NotFound,
    RateLimited,
    RejectedRequest,
    Unauthorized,
    UpstreamError,
)
from hrflow_client.profiles import Profile, ProfileWrite, profile_to_indexing_payload
from hrflow_client.rate import RateBudget

__all__ = [
    "ApiError",
    "BadRequest",
    "HrflowClient",
    "NotFound",
    "Profile",
    "ProfilePage",
    "ProfileWrite",
    "RateBudget",
    "RateLimited",
    "RejectedRequest",
    "Unauthorized",
    "UpstreamError",
    "profile_to_indexing_payload",
]
