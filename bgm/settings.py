"""Settings from environment variables, parsed once at start-up with clear errors.

A settings class is a frozen dataclass; each field ``name`` is read from ``{PREFIX}_{NAME}``
(e.g. ``BGM_STT_PORT``) and parsed by the field's type. A bad value raises SettingsError
naming the variable, the value and what was expected.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from bgm import vocab

T = TypeVar("T")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class SettingsError(ValueError):
    """An environment variable has a value that cannot be used."""


def _parse(var: str, raw: str, kind: Any) -> Any:
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(kind) if a is not type(None)]
        if raw.strip() == "":
            return None
        return _parse(var, raw, inner[0])
    if kind is bool:
        low = raw.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise SettingsError(f"{var}={raw!r} is not a boolean (use true/false, 1/0, yes/no, on/off)")
    if kind is int:
        try:
            return int(raw.strip())
        except ValueError:
            raise SettingsError(f"{var}={raw!r} is not an integer") from None
    if kind is float:
        try:
            return float(raw.strip())
        except ValueError:
            raise SettingsError(f"{var}={raw!r} is not a number") from None
    if kind is str:
        if raw and not raw.strip():
            # A token of spaces would otherwise read as "no token" and turn auth off silently.
            raise SettingsError(f"{var} is only whitespace; unset it or give it a value")
        return raw.strip()
    if origin is tuple:
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    raise TypeError(f"unsupported settings type {kind!r} for {var}")


def load(cls: type[T], prefix: str, env: Mapping[str, str] | None = None) -> T:
    """Build ``cls`` from environment variables named ``{prefix}_{FIELD}``."""
    env = os.environ if env is None else env
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        var = f"{prefix}_{field.name.upper()}"
        if var in env:
            values[field.name] = _parse(var, env[var], hints[field.name])
    try:
        settings = cls(**values)
    except SettingsError as exc:
        message = str(exc)
        if not message.startswith("BGM_"):  # a settings class shared by services names its field only
            raise SettingsError(f"{prefix}_{message}") from None
        raise
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"{prefix}_*: {exc}") from None
    return settings


def check(condition: bool, var: str, message: str) -> None:
    """For ``__post_init__`` range checks: raise SettingsError naming the variable."""
    if not condition:
        raise SettingsError(f"{var}: {message}")


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    """What every service's server needs; read from ``BGM_{SERVICE}_*``."""

    host: str = "127.0.0.1"
    port: int = 0
    # Requests handled at once; the excess gets RESOURCE_EXHAUSTED.
    max_concurrency: int = 2
    # Per-message limit on both ends; media always travels in smaller chunks.
    max_message_bytes: int = vocab.MAX_MESSAGE_BYTES
    # Largest total input one request may stream in, and the longest audio it may hold
    # (measured from the decoded samples, never from a container's header).
    max_input_bytes: int = 2 * 1024**3
    max_duration_s: float = 3 * 3600.0
    # A stream that sends nothing for idle_timeout_s is dropped; so is an upload still
    # unfinished after upload_timeout_s. Uploads hold no work slot, but at most max_uploads
    # are received at once.
    idle_timeout_s: float = 60.0
    upload_timeout_s: float = 3600.0
    max_uploads: int = 16
    grace_s: float = 30.0
    # A plaintext port serving only the health service (Kubernetes' gRPC probes cannot
    # speak TLS); 0: none.
    health_port: int = 0
    # Clients keep one connection per server for as long as it lives, so a replica added
    # later would get no traffic: a connection older than this is asked to go (new calls
    # reconnect through DNS to any replica; calls under way get 4 hours to finish).
    connection_age_s: float = 300.0
    log_level: str = "INFO"
    tmp_dir: str = ""
    # TLS: certificate and key (PEM paths); with client_ca, clients must present a
    # certificate it signed (mutual TLS).
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    # When set, every call except health and reflection needs 'authorization: Bearer <token>'.
    auth_token: str = ""

    def __post_init__(self) -> None:
        check(0 <= self.port <= 65535, "PORT", f"{self.port} is not a TCP port (0..65535)")
        check(0 <= self.health_port <= 65535, "HEALTH_PORT", f"{self.health_port} is not a TCP port (0..65535)")
        check(not self.health_port or self.health_port != self.port, "HEALTH_PORT", "must differ from PORT")
        check(self.max_concurrency >= 1, "MAX_CONCURRENCY", "must be at least 1")
        check(self.max_message_bytes >= vocab.MIN_MESSAGE_BYTES, "MAX_MESSAGE_BYTES",
              f"must be at least {vocab.MIN_MESSAGE_BYTES // vocab.MIB} MiB")
        check(self.max_input_bytes > 0, "MAX_INPUT_BYTES", "must be positive")
        check(self.max_duration_s > 0, "MAX_DURATION_S", "must be positive")
        check(self.idle_timeout_s > 0, "IDLE_TIMEOUT_S", "must be positive")
        check(self.upload_timeout_s > 0, "UPLOAD_TIMEOUT_S", "must be positive")
        check(self.max_uploads >= 1, "MAX_UPLOADS", "must be at least 1")
        check(self.grace_s >= 0, "GRACE_S", "must not be negative")
        check(self.connection_age_s >= 1, "CONNECTION_AGE_S", "must be at least 1 second")
        check(self.log_level.upper() in LOG_LEVELS, "LOG_LEVEL",
              f"{self.log_level!r} is not one of {', '.join(LOG_LEVELS)}")


def check_address(var: str, target: str) -> None:
    """A gRPC target a channel can use: ``host:port``, ``[v6]:port`` or ``scheme:///name:port``."""
    rest = target.split(":///", 1)[1] if ":///" in target else target
    host, sep, port = rest.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        valid_host = bool(host) and all(c in "0123456789abcdefABCDEF:." for c in host)
    else:
        valid_host = bool(host) and all(c.isalnum() or c in "-._" for c in host)
    if not (sep and valid_host and port.isdigit() and 0 < int(port) <= 65535):
        raise SettingsError(f"{var}={target!r} is not an address: use host:port (or dns:///name:port)")


def server_settings(service: str, env: Mapping[str, str] | None = None) -> ServerSettings:
    return load(ServerSettings, f"BGM_{service.upper()}", env)
