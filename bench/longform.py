"""Long videos: wall time, real-time factor, per-stage times, peak memory of every process
and temp disk, for generated 10- and 60-minute videos.

The video is espeak-ng speech in all seven moods (several lines per mood, pauses between
lines) over a looped royalty-free music bed, with a cheap low-resolution picture. It is
remixed by servers started as processes of their own, so this script (the client) is not
part of what is measured:

- ``embedded``: one gateway process with the four services in it (what ``bgm remix`` runs);
- ``services``: the four services and a gateway, each its own process (a deployment).

Memory is each process's resident set (with its children, ffmpeg included, counted
separately), sampled from /proc every 0.2 s; temp disk is the size of the servers' own
TMPDIR, sampled likewise, and what is left there at the end.

    python -m bench.longform [--minutes 10 60] [--modes embedded services] [--trace]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bgm import vocab
from bgm.chunks import iter_file_chunks
from bgm.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from gateway.example import speak
from tests.processes import free_port

RATE = vocab.SEPARATION_RATE
BED_LEVEL = 0.2
STAGES = {v: k.removeprefix("STAGE_").lower() for k, v in common_pb2.Stage.items()}
SERVICES = ("stt", "emotion", "music", "mixer")

# Four lines per mood, said one after another with pauses: a span of each mood.
LINES = {
    vocab.JOY: ("What a wonderful morning, the sun is out and everyone is smiling.",
                "We finally won the championship, I am so happy I could dance.",
                "My sister is getting married, and the whole family is delighted.",
                "This is the best news I have heard all year, thank you so much."),
    vocab.NEUTRAL: ("The meeting starts at nine and will take about an hour.",
                    "The report lists the figures for the first and second quarter.",
                    "Turn left at the station and walk two blocks to the library.",
                    "The package was delivered on Tuesday afternoon."),
    vocab.SADNESS: ("I miss my grandmother so much, the house feels empty without her.",
                    "We lost everything in the flood, and I do not know where to start.",
                    "He never came home, and I cried for days.",
                    "I feel so lonely since my best friend moved away."),
    vocab.ANGER: ("This is outrageous, they lied to us again and again.",
                  "I am furious that nobody fixed the problem after all this time.",
                  "How dare you treat my family like that, it is completely unacceptable.",
                  "Stop wasting my time with these ridiculous excuses."),
    vocab.FEAR: ("I heard footsteps behind me in the dark and I was terrified.",
                 "What if the bridge collapses while we are still on it?",
                 "I am scared that the storm will destroy our house tonight.",
                 "Something is moving in the basement and I am afraid to look."),
    vocab.SURPRISE: ("Wow, I never expected to see you here after all these years!",
                     "You bought a boat? I cannot believe it, that is amazing!",
                     "Suddenly the lights went out and the whole room gasped.",
                     "No way, the little team actually beat the champions!"),
    vocab.DISGUST: ("The kitchen was filthy and the milk smelled rotten.",
                    "That is disgusting, there is a hair in my soup.",
                    "The way they treated those animals made me feel sick.",
                    "The bathroom was covered in grime and it reeked."),
}
PAUSES_S = (1.5, 2.5, 1.0, 3.0)


def bed_tracks() -> list[Path]:
    try:
        import immich_memories_music
    except ImportError:
        return []
    root = Path(immich_memories_music.__file__).parent / "tracks"
    return [sorted((root / mood).glob("*.opus"))[0] for mood in ("calm", "tender", "happy")
            if any((root / mood).glob("*.opus"))]


def make_video(out: Path, minutes: float, work: Path) -> Path:
    """Write the test video, streaming: the audio goes to a WAV one line at a time."""
    import soundfile

    from bgm import media

    said: dict[str, np.ndarray] = {}
    for text in itertools.chain.from_iterable(LINES.values()):
        wav = work / "line.wav"
        speak(text, wav)
        said[text] = media.decode_audio(wav, RATE, 1, "espeak-ng's speech")[:, 0]
    beds = [media.decode_audio(p, RATE, 1, "the music bed")[:, 0] * BED_LEVEL for p in bed_tracks()]
    if not beds:
        beds = [BED_LEVEL * np.sin(2 * np.pi * 220 * np.arange(RATE * 10) / RATE)]
    total = round(minutes * 60 * RATE)
    wav_path = work / "audio.wav"
    written = 0
    bed_position = 0
    with soundfile.SoundFile(str(wav_path), "w", RATE, 1, "PCM_16") as wav:
        for section, mood in enumerate(itertools.cycle(LINES)):
            bed = beds[section // len(LINES) % len(beds)]
            for line, pause in zip(LINES[mood], PAUSES_S, strict=True):
                piece = np.concatenate([said[line], np.zeros(round(pause * RATE), np.float32)])
                piece = piece[: total - written]
                index = (bed_position + np.arange(piece.shape[0])) % bed.shape[0]
                wav.write(np.clip(piece + bed[index], -1, 1))
                bed_position += piece.shape[0]
                written += piece.shape[0]
                if written >= total:
                    break
            if written >= total:
                break
    duration = written / RATE
    subprocess.run(["ffmpeg", "-nostdin", "-y", "-loglevel", "error",
                    "-f", "lavfi", "-i", f"color=c=0x204060:size=320x180:rate=10:duration={duration}",
                    "-i", str(wav_path), "-map", "0:v", "-map", "1:a", "-c:v", "libx264", "-preset", "ultrafast",
                    "-pix_fmt", "yuv420p", "-c:a", "aac", "-b:a", "128k", "-t", str(duration),
                    "-movflags", "+faststart", str(out)], check=True)
    wav_path.unlink()
    return out


@dataclass
class Server:
    name: str
    address: str
    popen: subprocess.Popen[bytes]
    log: Path


def start(name: str, module: str, env: dict[str, str], logs: Path) -> Server:
    port = free_port()
    prefix = f"BGM_{name.upper()}"
    log = logs / f"{name}.log"
    with open(log, "wb") as out:
        popen = subprocess.Popen([sys.executable, "-m", module], stdout=out, stderr=out, env={
            **os.environ, **env, f"{prefix}_HOST": "127.0.0.1", f"{prefix}_PORT": str(port)})
    return Server(name, f"127.0.0.1:{port}", popen, log)


def wait_serving(server: Server, service: str, timeout: float = 900) -> None:
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(server.address))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.popen.poll() is not None:
            raise RuntimeError(f"{server.name} exited: {server.log.read_text()[-2000:]}")
        try:
            if stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status == \
                    health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{server.name} is not serving after {timeout:.0f} s")


def start_servers(mode: str, env: dict[str, str], logs: Path) -> list[Server]:
    """The servers for ``mode``; the gateway last."""
    servers = []
    gateway_env = dict(env)
    if mode == "services":
        for name in SERVICES:
            server = start(name, f"services.{name}", env, logs)
            servers.append(server)
            gateway_env[f"BGM_GATEWAY_{name.upper()}_ADDRESS"] = server.address
    servers.append(start("gateway", "gateway", gateway_env, logs))
    for server in servers:
        wait_serving(server, "bgm.v1.Gateway" if server.name == "gateway" else "")
    return servers


def stop(servers: list[Server]) -> None:
    for server in servers:
        if server.popen.poll() is None:
            server.popen.send_signal(signal.SIGTERM)
    for server in servers:
        try:
            server.popen.wait(60)
        except subprocess.TimeoutExpired:
            server.popen.kill()


def children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def disk_files(folder: Path, pids: list[int]) -> dict[str, int]:
    """Bytes on disk per file under ``folder`` (relative path), counting also the files the
    servers hold open there after removing them (temp files without a name), each once."""
    seen: dict[tuple[int, int], tuple[str, int]] = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with contextlib.suppress(OSError):
                st = os.lstat(path)
                seen[(st.st_dev, st.st_ino)] = (os.path.relpath(path, folder), st.st_blocks * 512)
    prefix = str(folder) + os.sep
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target.startswith(prefix) and target.endswith(" (deleted)"):
                        st = os.stat(f"/proc/{pid}/fd/{fd}")
                        name = os.path.relpath(target.removesuffix(" (deleted)"), folder)
                        seen.setdefault((st.st_dev, st.st_ino), (f"{name} (removed, still open)", st.st_blocks * 512))
    return dict(seen.values())


def disk_mib(folder: Path, pids: list[int] | None = None) -> float:
    return sum(disk_files(folder, pids or []).values()) / vocab.MIB


@dataclass
class Sampler:
    """Peak resident memory per process (by server; a server's children by command name)
    and peak temp disk, sampled until stopped."""

    servers: list[Server]
    tmp: Path
    peaks: dict[str, float] = field(default_factory=dict)
    peak_at: dict[str, float] = field(default_factory=dict)  # when (time.perf_counter) each peak was seen
    disk_peak_mib: float = 0.0
    disk_at_peak: dict[str, int] = field(default_factory=dict)  # the files then
    trace: list[tuple[float, dict[str, float]]] = field(default_factory=list)  # servers' memory over time
    disk_trace: list[dict[str, int]] = field(default_factory=list)  # the temp files, sampled with ``trace``
    done: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.wait(0.2):
            tree = children()
            now = {server.name: rss_mib(server.popen.pid) for server in self.servers}
            self.trace.append((time.perf_counter(), now))
            for server in self.servers:
                self._note(server.name, now[server.name])
                pending = list(tree.get(server.popen.pid, []))
                while pending:
                    pid = pending.pop()
                    pending.extend(tree.get(pid, []))
                    try:
                        command = Path(f"/proc/{pid}/comm").read_text().strip()
                    except OSError:
                        continue
                    self._note(f"{server.name}/{command}", rss_mib(pid))
            pids, pending = [], [server.popen.pid for server in self.servers]
            while pending:  # the servers and all their children
                pids.append(pending.pop())
                pending.extend(tree.get(pids[-1], []))
            files = disk_files(self.tmp, pids)
            self.disk_trace.append(files)
            if sum(files.values()) / vocab.MIB > self.disk_peak_mib:
                self.disk_peak_mib, self.disk_at_peak = sum(files.values()) / vocab.MIB, files

    def _note(self, name: str, mib: float) -> None:
        if mib > self.peaks.get(name, 0.0):
            self.peaks[name], self.peak_at[name] = mib, time.perf_counter()

    def stop(self) -> None:
        self.done.set()
        self.thread.join()


def remix(address: str, video: Path, out: Path) -> tuple[float, dict[str, tuple[float, float]]]:
    """Wall time and when each stage ran (first progress report to its 100 % report, in
    ``time.perf_counter`` seconds)."""
    def requests() -> Iterator[gateway_pb2.RemixRequest]:
        yield gateway_pb2.RemixRequest(options=gateway_pb2.RemixOptions(filename=video.name))
        for piece in iter_file_chunks(video):
            yield gateway_pb2.RemixRequest(video=piece)

    began: dict[str, float] = {}
    ended: dict[str, float] = {}
    stub = gateway_pb2_grpc.GatewayStub(grpc.insecure_channel(address, options=[
        ("grpc.max_receive_message_length", 64 * vocab.MIB)]))
    started = time.perf_counter()
    with open(out, "wb") as sink:
        for event in stub.Remix(requests(), timeout=4 * 3600):
            kind = event.WhichOneof("event")
            if kind == "progress":
                name, now = STAGES[event.progress.stage], time.perf_counter()
                began.setdefault(name, now)
                if event.progress.fraction >= 1.0:
                    ended[name] = now
            elif kind == "video":
                sink.write(event.video)
    wall = time.perf_counter() - started
    return wall, {name: (began[name], ended[name]) for name in ended}


def running_at(t: float, stages: dict[str, tuple[float, float]]) -> str:
    return " ".join(name for name, (a, b) in stages.items() if a <= t <= b) or "no stage reporting"


def by_folder(files: dict[str, int]) -> str:
    """Temp disk per top-level folder (one per request and service), largest first."""
    folders: dict[str, int] = {}
    for name, size in files.items():
        top = name.split(os.sep, 1)[0] if os.sep in name else "."
        folders[top] = folders.get(top, 0) + size
    return " ".join(f"{k.split('-', 2)[1] if k.count('-') >= 2 else k}:{v / vocab.MIB:.0f}"
                    for k, v in sorted(folders.items(), key=lambda item: -item[1]))


def print_trace(sampler: Sampler, stages: dict[str, tuple[float, float]], every_s: float = 5.0) -> None:
    """The servers' memory and the temp disk (per request folder) every ``every_s`` seconds,
    with the stages running then."""
    if not sampler.trace:
        return
    first, last_printed = sampler.trace[0][0], -every_s
    for (t, memory), files in zip(sampler.trace, sampler.disk_trace, strict=False):
        if t - first - last_printed < every_s:
            continue
        last_printed = t - first
        print(f"  {t - first:7.1f} s  " + "  ".join(f"{k} {v:5.0f}" for k, v in memory.items())
              + f"  MiB  disk {sum(files.values()) / vocab.MIB:5.0f} MiB ({by_folder(files)})"
              + f"  [{running_at(t, stages)}]")


def run(mode: str, video: Path, seconds: float, work: Path, trace: bool) -> None:
    tmp = work / f"tmp-{mode}"
    tmp.mkdir()
    logs = work / f"logs-{mode}-{seconds:g}s"  # one folder per run: several lengths run in one call
    logs.mkdir()
    servers = start_servers(mode, {"TMPDIR": str(tmp)}, logs)
    ready = {s.name: rss_mib(s.popen.pid) for s in servers}
    sampler = Sampler(servers, tmp)
    started = time.perf_counter()
    try:
        wall, stages = remix(servers[-1].address, video, work / "out.mp4")
    finally:
        sampler.stop()
        stop(servers)
    left = disk_mib(tmp)
    input_mib = video.stat().st_size / vocab.MIB
    decoded_mib = seconds * RATE * 4 / vocab.MIB  # the mono float32 audio at the separation rate
    print(f"\n== {seconds / 60:g} min, {mode}: wall {wall:.1f} s, real-time factor {wall / seconds:.3f}")
    for name, (began, ended) in stages.items():
        print(f"  stage {name:15s} {ended - began:7.1f} s")
    for name, peak in sorted(sampler.peaks.items()):
        at_ready = f" (ready: {ready[name]:.0f} MiB)" if name in ready else ""
        at = sampler.peak_at[name]
        print(f"  peak memory {name:22s} {peak:7.0f} MiB{at_ready} at {at - started:.1f} s [{running_at(at, stages)}]")
    print(f"  temp disk: peak {sampler.disk_peak_mib:.0f} MiB (input {input_mib:.0f} MiB + decoded audio "
          f"{decoded_mib:.0f} MiB; 3x input + decoded = {3 * input_mib + decoded_mib:.0f} MiB); left at the end "
          f"{left:.1f} MiB")
    for name, size in sorted(sampler.disk_at_peak.items(), key=lambda item: -item[1])[:12]:
        print(f"    at the peak: {size / vocab.MIB:7.0f} MiB  {name}")
    if trace:
        print_trace(sampler, stages)
    sys.stdout.flush()
    (work / "out.mp4").unlink(missing_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, nargs="+", default=[10.0, 60.0])
    parser.add_argument("--modes", nargs="+", choices=("embedded", "services"), default=["embedded", "services"])
    parser.add_argument("--trace", action="store_true", help="also print memory and temp disk every 5 s")
    parser.add_argument("--logs", type=Path, help="keep the servers' logs in this folder")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bgm-longform-") as name:
        work = Path(name)
        for minutes in args.minutes:
            video = make_video(work / f"long{minutes:g}.mp4", minutes, work)
            for mode in args.modes:
                run(mode, video, minutes * 60, work, args.trace)
                if args.logs:
                    shutil.copytree(work / f"logs-{mode}-{minutes * 60:g}s", args.logs / f"{minutes:g}min-{mode}",
                                    dirs_exist_ok=True)
            video.unlink()


if __name__ == "__main__":
    main()
