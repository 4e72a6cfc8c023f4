from __future__ import annotations

from dataclasses import dataclass

from bgm import vocab
from bgm.settings import check, check_address


@dataclass(frozen=True)
class GatewaySettings:
    """``BGM_GATEWAY_*``. Leave every address empty to run the four services in-process
    (embedded mode); ``dns:///name:port`` targets are balanced round-robin across pods."""

    stt_address: str = ""
    emotion_address: str = ""
    music_address: str = ""
    mixer_address: str = ""
    # Largest video a client may upload (its longest duration is BGM_GATEWAY_MAX_DURATION_S,
    # a server setting every service has).
    max_upload_bytes: int = 2 * 1024**3
    # Deadline for each stage's RPC.
    stage_timeout_s: float = 3600.0
    # Attempts per call the channel makes itself for a service that answers UNAVAILABLE
    # (1: no retries at all).
    retry_attempts: int = 4
    # How long a stage keeps retrying a service that is unreachable (covers a restart).
    retry_budget_s: float = 30.0
    tmp_dir: str = ""
    # The uploads' decoded audio kept by the upload's content in this folder (bgm.cache), up
    # to cache_mb: a second run on the same video (an edited timeline) skips the decode.
    cache_dir: str = ""
    cache_mb: int = 4096
    # Calls to the services: TLS (trusting services_ca), a client certificate for mutual
    # TLS, and the bearer token the services expect.
    services_ca: str = ""
    services_cert: str = ""
    services_key: str = ""
    services_token: str = ""

    def __post_init__(self) -> None:
        addresses = [self.stt_address, self.emotion_address, self.music_address, self.mixer_address]
        check(all(addresses) or not any(addresses), "BGM_GATEWAY_*_ADDRESS",
              "set all four service addresses, or none (embedded mode)")
        for service in vocab.BACKEND_SERVICES:
            if address := getattr(self, f"{service.name}_address"):
                check_address(f"{vocab.GATEWAY.env_prefix}_{service.name.upper()}_ADDRESS", address)
        check(self.max_upload_bytes > 0, "BGM_GATEWAY_MAX_UPLOAD_BYTES", "must be positive")
        check(self.stage_timeout_s > 0, "BGM_GATEWAY_STAGE_TIMEOUT_S", "must be positive")
        check(self.retry_attempts >= 1, "BGM_GATEWAY_RETRY_ATTEMPTS", "must be at least 1")
        check(self.cache_mb >= 0, "BGM_GATEWAY_CACHE_MB", "must be 0 or more")
        check(self.retry_budget_s >= 0, "BGM_GATEWAY_RETRY_BUDGET_S", "must not be negative")

    @property
    def embedded(self) -> bool:
        return not self.stt_address
