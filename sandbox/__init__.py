"""A sandbox HrFlow API for tests, ``make run`` and benchmarks (see :mod:`sandbox.app`)."""

from sandbox.app import DEFAULT_API_KEY, DEFAULT_API_USER, STATE, create_app, run_sandbox
from sandbox.samples import HARRY_POTTER_KEY, JOHN_DOE_KEY, SAMPLE_SOURCE_KEY

__all__ = [
    "DEFAULT_API_KEY",
    "DEFAULT_API_USER",
    "HARRY_POTTER_KEY",
    "JOHN_DOE_KEY",
    "SAMPLE_SOURCE_KEY",
    "STATE",
    "create_app",
    "run_sandbox",
]
