"""``python -m gateway``: the gateway server (the four services in-process unless their addresses
are set, where they are installed)."""

from __future__ import annotations

from collections.abc import Sequence

from bgm import settings, vocab
from bgm.server import Servicer, serve
from gateway.servicer import GatewayServicer
from gateway.settings import GatewaySettings


def build() -> Sequence[Servicer]:
    gateway = settings.load(GatewaySettings, vocab.GATEWAY.env_prefix)
    local = None
    if gateway.embedded:  # no addresses: the services run here too (`bgm serve all`)
        try:
            from services.embedded import EmbeddedServices
        except ImportError as exc:
            raise settings.SettingsError(
                f"BGM_GATEWAY_*_ADDRESS: not set, and the services cannot run in this process "
                f"(no Python module '{exc.name}'); set the four addresses") from None
        local = EmbeddedServices()
    return [GatewayServicer(gateway, settings.server_settings(vocab.GATEWAY.name), local)]


def main() -> None:
    serve(vocab.GATEWAY.name, build)


if __name__ == "__main__":
    main()
