"""Starting bgm services as separate processes on loopback, as a deployment runs them."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import grpc

from tests.conftest import channel, health_status

HEALTH_NAMES = {
    "stt": "bgm.v1.SpeechToText",
    "emotion": "bgm.v1.EmotionClassifier",
    "music": "bgm.v1.MusicGenerator",
    "mixer": "bgm.v1.Mixer",
    "gateway": "bgm.v1.Gateway",
}


_HANDED_OUT: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A loopback port free now and below the kernel's ephemeral range: a port picked with
    bind(0) is an ephemeral one, which any process's outgoing connection (a service already
    started talking to another) can take before the server this port is for binds it."""
    rng, below = random.Random(), max(20_001, _ephemeral_low())
    for _ in range(200):
        port = rng.randrange(20_000, below)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Process:
    name: str
    port: int
    popen: subprocess.Popen
    log: Path
    log_file: IO[bytes] = field(repr=False)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_serving(self, timeout: float = 300) -> None:
        ch = channel(self.address)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.log.read_text()[-2000:]}")
            try:
                if health_status(ch, HEALTH_NAMES[self.name]) == "SERVING":
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{self.name} not serving: {self.log.read_text()[-2000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
        self.log_file.close()


def spawn(name: str, command: list[str], env: dict[str, str], workdir: Path, port: int | None = None) -> Process:
    port = port or free_port()
    prefix = f"BGM_{name.upper()}"
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / f"{name}.log"
    log_file = open(log, "wb")  # noqa: SIM115 - lives as long as the process; closed by stop()
    full_env = {**os.environ, **env, f"{prefix}_HOST": "127.0.0.1", f"{prefix}_PORT": str(port),
                f"{prefix}_GRACE_S": "2"}
    popen = subprocess.Popen(command, env=full_env, stdout=log_file, stderr=log_file)
    return Process(name, port, popen, log, log_file)


def spawn_all(workdir: Path) -> dict[str, Process]:
    """The four services, then a gateway pointed at them."""
    procs = {name: spawn(name, [sys.executable, "-m", f"services.{name}"], {}, workdir)
             for name in ("stt", "emotion", "music", "mixer")}
    gateway_env = {f"BGM_GATEWAY_{name.upper()}_ADDRESS": p.address for name, p in procs.items()}
    gateway_env["BGM_GATEWAY_RETRY_ATTEMPTS"] = "3"
    procs["gateway"] = spawn("gateway", [sys.executable, "-m", "gateway"], gateway_env, workdir)
    for proc in procs.values():
        proc.wait_serving()
    return procs
