"""All four services in this process, each on its own loopback port, reached over gRPC
exactly as a deployment reaches them.

This is where the in-process composition lives (the `bgm` command without ``--gateway``,
`bgm serve all`, the tests): the gateway itself only ever talks to addresses, so its image
installs none of the services.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from bgm import settings, vocab
from bgm.server import RunningServer, Servicer, start_server
from bgm.settings import ServerSettings
from services.emotion.servicer import EmotionServicer
from services.emotion.settings import EmotionSettings
from services.mixer.servicer import MixerServicer
from services.mixer.settings import MixerSettings
from services.music.servicer import MusicServicer
from services.music.settings import MusicSettings
from services.stt.servicer import SpeechToTextServicer
from services.stt.settings import SttSettings


class EmbeddedServices:
    """Starts the four services on 127.0.0.1 with free ports; settings come from the usual
    variables (their HOST and PORT are ignored: embedded services are loopback-only)."""

    def __init__(self) -> None:
        self.running: dict[str, RunningServer] = {}

    async def start(self) -> dict[str, str]:
        """Start every service (their models load in the background); their addresses by name."""
        makers: dict[str, Callable[[ServerSettings], Servicer]] = {
            vocab.STT.name: lambda s: SpeechToTextServicer(settings.load(SttSettings, vocab.STT.env_prefix), s),
            vocab.EMOTION.name: lambda s: EmotionServicer(settings.load(EmotionSettings, vocab.EMOTION.env_prefix), s),
            vocab.MUSIC.name: lambda s: MusicServicer(settings.load(MusicSettings, vocab.MUSIC.env_prefix), s),
            vocab.MIXER.name: lambda s: MixerServicer(settings.load(MixerSettings, vocab.MIXER.env_prefix), s),
        }
        for service in vocab.BACKEND_SERVICES:
            local = replace(settings.server_settings(service.name), host="127.0.0.1", port=0)
            self.running[service.name] = await start_server([makers[service.name](local)], local)
        return {name: server.address for name, server in self.running.items()}

    def port(self, service: vocab.Service) -> int:
        return self.running[service.name].port

    async def wait_ready(self, timeout: float = 300.0) -> None:
        for server in self.running.values():
            await server.wait_ready(timeout)

    async def stop(self, grace: float = 2.0) -> None:
        for server in self.running.values():
            await server.stop(grace)
        self.running.clear()
