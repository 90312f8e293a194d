"""The gateway's settings, in one place.

- ``GatewaySettings``: what one app needs besides its backend (``create_app(backend,
  settings)``). A plain frozen value with finite defaults; it reads no environment.
- ``ServeSettings``: everything ``safetygame serve`` runs with (upstream, listening address,
  the app's settings, its connection limits, workers). One ``pydantic_settings.BaseSettings``
  with these sources, first one wins:

  1. command-line flags (``--max-body-bytes``; the flag names are in ``ServeSettings.flags``),
  2. environment variables ``SAFETYGAME_<FIELD>`` (``SAFETYGAME_MAX_BODY_BYTES``),
  3. a YAML file (``serve --config FILE``; keys are the field names),
  4. the defaults below (those of ``GatewaySettings`` and ``HttpLimits``).

  The ``serve`` command's options are generated from the fields, and ``--workers N`` passes
  the validated settings to each worker as JSON on its stdin (``worker_json`` /
  ``from_worker_json``), so a worker runs with exactly its supervisor's settings and the
  upstream API key never appears on a command line.
"""

from __future__ import annotations

import contextvars
import json
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from safetygame.errors import ConfigError
from safetygame.gateway.audit import DEFAULT_AUDIT_URL
from safetygame.gateway.http import HttpLimits

__all__ = ["ENV_PREFIX", "GatewaySettings", "ServeSettings"]

ENV_PREFIX = "SAFETYGAME_"


@dataclass(frozen=True)
class GatewaySettings:
    """Everything the gateway needs besides the backend. Finite defaults."""

    policy: str = "default"  # policy of the default tenant / tenants that name none
    tenants_file: Path | None = None  # tenants.yml: per-tenant policy and key hashes
    audit_url: str = DEFAULT_AUDIT_URL
    model_name: str = "safetygame"  # the id served by /v1/models
    max_body_bytes: int = 1_000_000
    max_moderation_inputs: int = 32  # texts per POST /v1/moderations (each costs model calls)
    # Seconds from a request's arrival to its answer: body, decision and audit write. The
    # decision fails safe (status timeout) ``audit_reserve`` before it, which leaves the
    # audit write that long; an answer not recorded by the deadline is a 503.
    decision_timeout: float = 120.0
    audit_timeout: float = 5.0  # at most this share of decision_timeout (half for short ones)
    # A streamed chat whose decision takes longer than this gets its headers and then an SSE
    # comment (": keep-alive") every this many seconds until the answer, so proxies with idle
    # timeouts keep the connection; 0 = off (headers only once the answer is recorded).
    stream_keepalive: float = 10.0
    reload_interval: float = 1.0  # seconds between checks of the policy / tenants files
    max_decisions_page: int = 500
    max_decisions_bytes: int = 8_000_000  # JSON bytes of one /v1/safetygame/decisions page
    http: HttpLimits = field(default_factory=HttpLimits)  # connection limits (http.py)

    def __post_init__(self) -> None:
        if self.max_body_bytes < 1024:
            raise ConfigError("max_body_bytes must be >= 1024")
        if self.max_moderation_inputs < 1:
            raise ConfigError("max_moderation_inputs must be >= 1")
        if not 0 < self.decision_timeout < math.inf:
            raise ConfigError("decision_timeout must be a finite number > 0")
        if not 0 < self.audit_timeout < math.inf:
            raise ConfigError("audit_timeout must be a finite number > 0")
        if not self.reload_interval > 0:
            raise ConfigError("reload_interval must be > 0")
        if not 0 <= self.stream_keepalive < math.inf:
            raise ConfigError("stream_keepalive must be a finite number >= 0 (0 = off)")
        if self.max_decisions_bytes < 2 * self.max_body_bytes:
            raise ConfigError("max_decisions_bytes must be >= 2 x max_body_bytes")

    @property
    def audit_reserve(self) -> float:
        """Seconds of ``decision_timeout`` kept for the audit write."""
        return min(self.audit_timeout, self.decision_timeout / 2)


_GW = GatewaySettings()
_HTTP = HttpLimits()
LogLevel = Literal["debug", "info", "warning", "error"]
UpstreamTransport = Literal["hand", "httpx"]  # backends.transport.TransportKind

# The config file of the current ``ServeSettings.load`` call (see settings_customise_sources).
_CONFIG_FILE: contextvars.ContextVar[Path | None] = contextvars.ContextVar(
    "safetygame_serve_config", default=None
)


class ServeSettings(BaseSettings):
    """The settings of ``safetygame serve`` (sources and their order: module docstring)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", frozen=True, validate_default=True
    )

    upstream: str = Field(
        description="OpenAI-compatible server URL, or 'embedded' for the packaged llama.cpp model."
    )
    policy: str = Field(
        _GW.policy,
        description="Policy file or shipped name (the default tenant's, and tenants that "
        "name none).",
    )
    tenants_file: Path | None = Field(
        None, description="tenants.yml: per-tenant policy and API-key hashes (enables auth)."
    )
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535, description="0 = a free port.")
    model: str | None = Field(
        None, description="Upstream model name (URL) or packaged model / GGUF path (embedded)."
    )
    served_model: str = Field(
        _GW.model_name, description="The model id clients send and /v1/models lists."
    )
    audit_url: str = Field(_GW.audit_url, description="sqlite:///PATH or postgresql://...")
    upstream_api_key: SecretStr | None = Field(None, description="Key for the upstream.")
    timeout: float = Field(
        _GW.decision_timeout,
        description="Request deadline in seconds (body, decision, audit write; docs/gateway.md).",
    )
    upstream_concurrency: int = Field(
        16, ge=1, description="Upstream calls in flight at once (URL upstreams)."
    )
    upstream_transport: UpstreamTransport = Field(
        "hand",
        description="HTTP client for a plain-http URL upstream: the hand-written keep-alive "
        "transport (backends/transport.py) or httpx's own pool.",
    )
    max_body_bytes: int = Field(_GW.max_body_bytes, description="Bytes of one request body.")
    reload_interval: float = Field(
        _GW.reload_interval, description="Seconds between checks of the policy and tenants files."
    )
    max_header_bytes: int = Field(
        _HTTP.max_header_bytes, description="Bytes of one request's line and headers (431 past it)."
    )
    max_header_count: int = Field(
        _HTTP.max_header_count, description="Headers in one request (431 past it)."
    )
    header_timeout: float = Field(
        _HTTP.header_timeout,
        description="Seconds to receive a request's headers (408 and close past it).",
    )
    keepalive_timeout: float = Field(
        _HTTP.keepalive_timeout, description="Seconds an idle keep-alive connection stays open."
    )
    stream_keepalive: float = Field(
        _GW.stream_keepalive,
        ge=0.0,
        description="Streamed chats: seconds of deciding before the headers go out and an SSE "
        "keep-alive comment follows every as many seconds (0 = off).",
    )
    log_level: LogLevel = "info"
    workers: int = Field(
        1,
        ge=1,
        le=64,
        description="Gateway processes sharing the port (URL upstreams; see docs/gateway.md).",
    )

    # Flags whose names are not ``--`` + the field name with dashes.
    FLAGS: typing.ClassVar[Mapping[str, tuple[str, ...]]] = {
        "tenants_file": ("--keys", "--tenants"),
        "audit_url": ("--audit",),
        "upstream_api_key": ("--api-key",),
        "max_header_count": ("--max-headers",),
    }

    @classmethod
    def flags(cls, name: str) -> tuple[str, ...]:
        """The command-line flags of field ``name``."""
        return cls.FLAGS.get(name, ("--" + name.replace("_", "-"),))

    @classmethod
    def env_name(cls, name: str) -> str:
        return ENV_PREFIX + name.upper()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # flags (passed to __init__) > SAFETYGAME_* env > --config YAML > defaults
        path = _CONFIG_FILE.get()
        if path is None:
            return init_settings, env_settings
        return init_settings, env_settings, YamlConfigSettingsSource(settings_cls, path)

    @model_validator(mode="after")
    def _check(self) -> ServeSettings:
        self.gateway()  # ConfigError (a ValueError) names the bad setting
        return self

    @classmethod
    def load(
        cls, flags: Mapping[str, Any] | None = None, config_file: Path | None = None
    ) -> ServeSettings:
        """Settings from ``flags`` (field name -> value, given flags only), the environment
        and ``config_file``. Raises ConfigError naming the flag and variable of a bad value."""
        if config_file is not None and not config_file.is_file():
            raise ConfigError(f"--config: {config_file} is not a file")
        token = _CONFIG_FILE.set(config_file)
        try:
            return cls(**dict(flags or {}))
        except ValidationError as exc:
            raise ConfigError(cls._describe(exc, config_file)) from None
        finally:
            _CONFIG_FILE.reset(token)

    @classmethod
    def _describe(cls, exc: ValidationError, config_file: Path | None) -> str:
        parts = []
        for err in exc.errors(include_url=False, include_input=False):
            name = str(err["loc"][0]) if err["loc"] else ""
            msg = str(err["msg"]).removeprefix("Value error, ")
            if name in cls.model_fields:
                where = f"{'/'.join(cls.flags(name))} (env {cls.env_name(name)}"
                where += f", {name} in {config_file})" if config_file else ")"
                parts.append(f"{where}: {msg}")
            elif name:
                parts.append(f"{name} (in {config_file}): {msg}")
            else:
                parts.append(msg)
        return "invalid gateway settings: " + "; ".join(parts)

    def gateway(self) -> GatewaySettings:
        """The app's settings (``create_app(backend, settings.gateway())``)."""
        return GatewaySettings(
            policy=self.policy,
            tenants_file=self.tenants_file,
            audit_url=self.audit_url,
            model_name=self.served_model,
            max_body_bytes=self.max_body_bytes,
            decision_timeout=self.timeout,
            stream_keepalive=self.stream_keepalive,
            reload_interval=self.reload_interval,
            http=HttpLimits(
                max_header_bytes=self.max_header_bytes,
                max_header_count=self.max_header_count,
                header_timeout=self.header_timeout,
                keepalive_timeout=self.keepalive_timeout,
            ),
        )

    @property
    def api_key(self) -> str | None:
        return None if self.upstream_api_key is None else self.upstream_api_key.get_secret_value()

    def worker_json(self) -> str:
        """Every setting as JSON, secrets included: for a worker's stdin, never a command line."""
        data = self.model_dump(mode="json")
        for name, value in self:
            if isinstance(value, SecretStr):
                data[name] = value.get_secret_value()
        return json.dumps(data, ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_worker_json(cls, text: str) -> ServeSettings:
        """The settings a supervisor wrote with ``worker_json`` (every field is given, so the
        worker's environment cannot change any of them)."""
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            raise ConfigError(cls._describe(exc, None)) from None
