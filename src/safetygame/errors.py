"""Exceptions raised by safetygame.

The tree::

    SafetygameError
    ├── ConfigError (also ValueError)      bad input, bad policy, bad request: fixable by the caller
    ├── ModelNotInstalledError             a packaged model is missing or corrupt (names the fix)
    ├── DataUnavailableError               a benchmark file could not be downloaded or failed
    │                                      its checksum (names the URL, hash and the fix)
    └── BackendError                       the model could not be reached or misbehaved
        ├── BackendTimeout
        ├── BackendRateLimited
        ├── BackendUnsupported             the backend lacks an ability (e.g. log-likelihood)
        └── BackendProtocolError           the upstream answered with something unusable

Expected outcomes (an infeasible game, nothing better than refusing) are *statuses* on
results, never exceptions.
"""

from __future__ import annotations


class SafetygameError(Exception):
    """Base class of every error raised by safetygame."""


class ConfigError(SafetygameError, ValueError):
    """Invalid input, policy or request; the message names the offending field."""


class ModelNotInstalledError(SafetygameError):
    """A packaged model file is missing or fails its checksum."""


class DataUnavailableError(SafetygameError):
    """A benchmark file could not be downloaded, or what arrived failed its sha256."""


class BackendError(SafetygameError):
    """The model backend failed."""


class BackendTimeout(BackendError):
    """The backend did not answer in time."""


class BackendRateLimited(BackendError):
    """The backend kept answering 429 after all retries."""


class BackendUnsupported(BackendError):
    """The backend cannot do what was asked (e.g. no log-probabilities, no log-likelihood)."""


class BackendProtocolError(BackendError):
    """The backend answered, but with something that cannot be used."""
