"""``python -m gateway``: the gateway server (embedded services unless addresses are set)."""

from __future__ import annotations

from collections.abc import Sequence

from bgm import settings, vocab
from bgm.server import Servicer, serve
from gateway.servicer import GatewayServicer
from gateway.settings import GatewaySettings


def build() -> Sequence[Servicer]:
    return [GatewayServicer(settings.load(GatewaySettings, vocab.GATEWAY.env_prefix),
                            settings.server_settings(vocab.GATEWAY.name))]


def main() -> None:
    serve(vocab.GATEWAY.name, build)


if __name__ == "__main__":
    main()
