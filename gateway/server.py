"""``python -m gateway``: the gateway server (embedded services unless addresses are set)."""

from __future__ import annotations

from collections.abc import Sequence

from bgm import settings
from bgm.server import Servicer, serve
from gateway.servicer import GatewayServicer
from gateway.settings import GatewaySettings


def build() -> Sequence[Servicer]:
    return [GatewayServicer(settings.load(GatewaySettings, "BGM_GATEWAY"), settings.server_settings("gateway"))]


def main() -> None:
    serve("gateway", build)


if __name__ == "__main__":
    main()
