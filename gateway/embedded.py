"""All four services in this process, each on its own loopback port, reached over gRPC
exactly as a deployment reaches them."""

from __future__ import annotations

from dataclasses import dataclass, replace

from bgm import settings, vocab
from bgm.server import RunningServer, start_server
from services.emotion.servicer import EmotionServicer
from services.emotion.settings import EmotionSettings
from services.mixer.servicer import MixerServicer
from services.mixer.settings import MixerSettings
from services.music.servicer import MusicServicer
from services.music.settings import MusicSettings
from services.stt.servicer import SpeechToTextServicer
from services.stt.settings import SttSettings


@dataclass
class EmbeddedServices:
    stt: RunningServer
    emotion: RunningServer
    music: RunningServer
    mixer: RunningServer

    @property
    def all(self) -> list[RunningServer]:
        return [self.stt, self.emotion, self.music, self.mixer]

    async def wait_ready(self, timeout: float = 300.0) -> None:
        for server in self.all:
            await server.wait_ready(timeout)

    async def stop(self, grace: float = 2.0) -> None:
        for server in self.all:
            await server.stop(grace)


async def start_embedded() -> EmbeddedServices:
    """Start the services on 127.0.0.1 with free ports; settings come from the usual variables
    (their HOST and PORT are ignored: embedded services are loopback-only)."""

    def local(service: str) -> settings.ServerSettings:
        return replace(settings.server_settings(service), host="127.0.0.1", port=0)

    stt = local(vocab.STT.name)
    emotion = local(vocab.EMOTION.name)
    music = local(vocab.MUSIC.name)
    mixer = local(vocab.MIXER.name)
    return EmbeddedServices(
        stt=await start_server([SpeechToTextServicer(settings.load(SttSettings, vocab.STT.env_prefix), stt)], stt),
        emotion=await start_server(
            [EmotionServicer(settings.load(EmotionSettings, vocab.EMOTION.env_prefix), emotion)], emotion),
        music=await start_server(
            [MusicServicer(settings.load(MusicSettings, vocab.MUSIC.env_prefix), music)], music),
        mixer=await start_server(
            [MixerServicer(settings.load(MixerSettings, vocab.MIXER.env_prefix), mixer)], mixer),
    )
