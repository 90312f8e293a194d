"""API keys and tenants: the ``tenants.yml`` file, hashed keys, constant-time lookup.

A tenants file maps each tenant to its policy and to the sha256 of its API keys::

    tenants:
      acme:
        policy: policies/acme.yml      # a path (relative to this file) or a shipped name
        keys:
          - sha256:5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8
      globex:
        policy: default
        keys: [sha256:...]

Keys are random tokens (``safetygame hash-key`` makes one and prints its hash), so one
sha256 is enough: unlike passwords they cannot be guessed from a dictionary. The file never
holds a key itself. Lookup compares the presented key's hash against every stored hash with
``hmac.compare_digest`` and does not stop at the first match.

A key must have at least ``MIN_KEY_LENGTH`` (32) characters: ``hash-key`` refuses to hash a
shorter one, and since the file holds only hashes, a shorter presented key never matches
any entry of a tenants file (so a short key hashed by other means cannot be used).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from safetygame._yaml import load_yaml
from safetygame.errors import ConfigError

HASH_PREFIX = "sha256:"
_HASH_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_TENANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
DEFAULT_TENANT = "default"
MIN_KEY_LENGTH = 32  # characters; ``new_key`` makes 46 (256 random bits)


def check_key(key: str) -> str:
    """``key`` if it is long enough to be an API key, else ConfigError."""
    if len(key) < MIN_KEY_LENGTH:
        raise ConfigError(
            f"API keys must have at least {MIN_KEY_LENGTH} characters (got {len(key)}); "
            "run `safetygame hash-key` without an argument for a random one"
        )
    return key


def hash_key(key: str) -> str:
    """``sha256:<hex>`` of an API key, the form stored in ``tenants.yml``."""
    return HASH_PREFIX + hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    """A fresh random API key (256 bits)."""
    return "sg-" + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class TenantConfig:
    name: str
    policy: str  # a path or a shipped policy name
    key_hashes: tuple[str, ...] = ()


@dataclass(frozen=True)
class TenantsConfig:
    """Every tenant, and whether requests must carry a key."""

    tenants: dict[str, TenantConfig]
    auth_required: bool

    @classmethod
    def single(cls, policy: str) -> TenantsConfig:
        """No tenants file: one open tenant, ``default``."""
        return cls({DEFAULT_TENANT: TenantConfig(DEFAULT_TENANT, policy)}, auth_required=False)


def _resolve_policy_ref(ref: str, base: Path) -> str:
    """Relative paths are relative to the tenants file; bare names may be shipped policies."""
    p = Path(ref)
    if p.is_absolute():
        return str(p)
    candidate = base / p
    if candidate.exists() or "/" in ref or ref.endswith((".yml", ".yaml")):
        return str(candidate)
    return ref


def parse_tenants(data: Any, source: str, base: Path, default_policy: str) -> TenantsConfig:
    """Validate a parsed tenants file; errors name the field."""
    if not isinstance(data, dict) or not isinstance(data.get("tenants"), dict):
        raise ConfigError(f"Invalid tenants file {source}: expected a mapping 'tenants:'")
    extra = set(data) - {"tenants"}
    if extra:
        raise ConfigError(f"Invalid tenants file {source}: unknown keys {sorted(extra)}")
    tenants: dict[str, TenantConfig] = {}
    seen: dict[str, str] = {}
    for name, spec in data["tenants"].items():
        where = f"tenants.{name}"
        if not isinstance(name, str) or not _TENANT_RE.match(name):
            raise ConfigError(f"Invalid tenants file {source}: {where}: bad tenant name")
        if spec is None:
            spec = {}
        if not isinstance(spec, dict):
            raise ConfigError(f"Invalid tenants file {source}: {where} must be a mapping")
        unknown = set(spec) - {"policy", "keys"}
        if unknown:
            raise ConfigError(
                f"Invalid tenants file {source}: {where}: unknown keys {sorted(unknown)}"
            )
        policy = spec.get("policy", default_policy)
        if not isinstance(policy, str) or not policy:
            raise ConfigError(f"Invalid tenants file {source}: {where}.policy must be a string")
        keys = spec.get("keys", [])
        if not isinstance(keys, list) or not keys:
            raise ConfigError(
                f"Invalid tenants file {source}: {where}.keys must be a non-empty list"
            )
        for i, h in enumerate(keys):
            if not isinstance(h, str) or not _HASH_RE.match(h):
                raise ConfigError(
                    f"Invalid tenants file {source}: {where}.keys[{i}] must be 'sha256:<64 hex>' "
                    "(store the hash of a key, never the key)"
                )
            if h in seen:
                raise ConfigError(
                    f"Invalid tenants file {source}: {where}.keys[{i}] is also a key of tenant "
                    f"{seen[h]!r}"
                )
            seen[h] = name
        tenants[name] = TenantConfig(name, _resolve_policy_ref(policy, base), tuple(keys))
    if not tenants:
        raise ConfigError(f"Invalid tenants file {source}: 'tenants' is empty")
    return TenantsConfig(tenants, auth_required=True)


def load_tenants(path: str | Path, default_policy: str = "default") -> TenantsConfig:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"Invalid tenants file {path}: not UTF-8 text (byte {exc.start})"
        ) from None
    except OSError as exc:
        raise ConfigError(f"Tenants file {path}: cannot read ({exc.strerror})") from None
    try:
        data = load_yaml(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"Invalid tenants file {path}: not valid YAML ({exc})") from None
    return parse_tenants(data, str(path), path.parent, default_policy)


class KeyRing:
    """Maps a presented API key to its tenant."""

    def __init__(self, config: TenantsConfig) -> None:
        self.auth_required = config.auth_required
        self._entries = [
            (h.encode("ascii"), t.name) for t in config.tenants.values() for h in t.key_hashes
        ]

    def tenant_for(self, key: str | None) -> str | None:
        """The tenant owning ``key``, or None. Without configured keys every caller is
        the default tenant."""
        if not self.auth_required:
            return DEFAULT_TENANT
        if not key or len(key) < MIN_KEY_LENGTH:
            return None
        presented = hash_key(key).encode("ascii")
        found: str | None = None
        for stored, tenant in self._entries:  # no early exit: same work for every key
            if hmac.compare_digest(stored, presented):
                found = tenant
        return found


def bearer_token(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()
