"""The compose stack on a real container engine, from a clean state, as a user meets it.

Builds the five CPU images (docker-compose.yml), removes any earlier stack and its volumes,
brings the stack up and waits for every service to report healthy, then:

1. remixes the example video through the gateway container (``bgm remix --gateway``) and
   checks the output: picture stream bit-identical, loudness -14 +/- 0.5 LUFS, duration kept;
2. stops the music service and checks that a remix fails with UNAVAILABLE naming the stage;
3. kills the music process (SIGKILL from the host, as a crash) and checks that the restart
   policy brings it back healthy and a remix works again, by itself;
4. scales music to 2 replicas and checks that each serves at least 2 of 8 remixes;
5. tears everything down (``down -v``), also on failure.

Needs ``docker`` with a running engine and ``docker-compose`` (Debian's v1), and a local
install of bgm for the client (``bgm example``/``bgm remix``). Not part of the default CI run.

    python -m bench.compose_smoke [--no-build] [--json FILE]

The music replicas are asked to recycle client connections every few seconds
(``BGM_MUSIC_CONNECTION_AGE_S``) so that a replica added mid-run is found without waiting
the default 5 minutes; everything else is the compose file as shipped.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.measures import video_md5
from bgm import loudness, media

ROOT = Path(__file__).resolve().parents[1]
PROJECT = "bgm-smoke"
SERVICES = ("stt", "emotion", "music", "mixer", "gateway")
GATEWAY = "127.0.0.1:50050"
TARGET_LUFS, LUFS_TOLERANCE = -14.0, 0.5
OVERRIDE = """services:
  music:
    environment:
      BGM_MUSIC_CONNECTION_AGE_S: "{age}"
"""


class SmokeFailed(Exception):
    pass


@dataclass
class Report:
    build_s: float = 0.0
    image_mb: dict[str, float] = field(default_factory=dict)
    healthy_s: float = 0.0
    remix_s: float = 0.0
    picture_identical: bool = False
    lufs: float = 0.0
    duration_in_s: float = 0.0
    duration_out_s: float = 0.0
    stopped_exit_code: int = 0
    stopped_message: str = ""
    stopped_s: float = 0.0
    recovered_s: float = 0.0
    recovered_remix_ok: bool = False
    per_replica: dict[str, int] = field(default_factory=dict)
    passed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


class Stack:
    def __init__(self, override: Path) -> None:
        self.files = ["-f", str(ROOT / "docker-compose.yml"), "-f", str(override)]

    def compose(self, *args: str, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
        command = ["docker-compose", "-p", PROJECT, *self.files, *args]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise SmokeFailed(f"{' '.join(command[1:])} failed:\n{done.stderr[-3000:]}")
        return done

    def containers(self, service: str) -> list[str]:
        return self.compose("ps", "-q", service).stdout.split()

    def health(self, container: str) -> str:
        return docker("inspect", "-f", "{{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}",
                      container).strip()

    def wait_healthy(self, services: Sequence[str], timeout: float, replicas: int = 1) -> float:
        began = time.monotonic()
        while time.monotonic() - began < timeout:
            states = {s: [self.health(c) for c in self.containers(s)] for s in services}
            if all(len(v) >= replicas and all(h == "healthy" for h in v) for v in states.values()):
                return time.monotonic() - began
            if any(h == "unhealthy" for v in states.values() for h in v):
                raise SmokeFailed(f"unhealthy: {states}")
            time.sleep(2)
        raise SmokeFailed(f"not healthy within {timeout:.0f} s: {states}")


def docker(*args: str) -> str:
    done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise SmokeFailed(f"docker {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def bgm(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def remix(video: Path, out: Path) -> tuple[subprocess.CompletedProcess[str], float]:
    began = time.monotonic()
    done = bgm("remix", str(video), "-o", str(out), "--gateway", GATEWAY, "--quiet")
    return done, time.monotonic() - began


def generate_calls(container: str) -> int:
    """Music Generate calls this container has answered (its JSON log's 'rpc ok' lines)."""
    logs = subprocess.run(["docker", "logs", container], capture_output=True, text=True, timeout=60)
    return sum("rpc ok" in line and "MusicGenerator/Generate" in line
               for line in (logs.stdout + logs.stderr).splitlines())


def check(report: Report, name: str, ok: bool, detail: str = "") -> None:
    (report.passed if ok else report.failed).append(f"{name}{': ' + detail if detail else ''}")
    print(f"{'ok  ' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)


def run(args: argparse.Namespace, report: Report, stack: Stack, work: Path) -> None:
    if not args.no_build:
        began = time.monotonic()
        stack.compose("build", timeout=3600)
        report.build_s = time.monotonic() - began
    for service in SERVICES:
        size = docker("image", "inspect", "-f", "{{.Size}}", f"bgm-{service}:latest")
        report.image_mb[service] = round(int(size) / 1e6)
    stack.compose("down", "-v", "--remove-orphans")  # a clean state: no container, no volume
    began = time.monotonic()
    stack.compose("up", "-d")
    stack.wait_healthy(SERVICES, timeout=900)
    report.healthy_s = time.monotonic() - began
    print(f"stack healthy in {report.healthy_s:.0f} s", flush=True)

    video = work / "demo.mp4"
    made = bgm("example", str(video))
    if made.returncode != 0:
        raise SmokeFailed(f"bgm example failed: {made.stderr}")
    out = work / "demo.remixed.mp4"
    done, report.remix_s = remix(video, out)
    check(report, "remix through the gateway container", done.returncode == 0, done.stderr.strip()[-300:])
    if done.returncode == 0:
        report.picture_identical = video_md5(out) == video_md5(video)
        check(report, "picture stream bit-identical", report.picture_identical)
        audio = media.decode_audio(out, 48_000, 2)
        report.lufs = round(loudness.loudness(audio, 48_000), 2)
        check(report, "loudness", abs(report.lufs - TARGET_LUFS) <= LUFS_TOLERANCE, f"{report.lufs} LUFS")
        report.duration_in_s = media.probe(video).duration_s
        report.duration_out_s = media.probe(out).duration_s
        check(report, "duration kept", abs(report.duration_in_s - report.duration_out_s) < 0.05,
              f"{report.duration_in_s:.2f} s -> {report.duration_out_s:.2f} s")

    stack.compose("stop", "music")
    done, report.stopped_s = remix(video, work / "stopped.mp4")
    report.stopped_exit_code = done.returncode
    report.stopped_message = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ""
    check(report, "a stopped service is a clear UNAVAILABLE naming the stage",
          done.returncode == 4 and "the music service is unavailable" in report.stopped_message,
          f"exit {done.returncode} after {report.stopped_s:.1f} s: {report.stopped_message}")
    check(report, "nothing written on failure", not (work / "stopped.mp4").exists())
    stack.compose("start", "music")
    stack.wait_healthy(["music"], timeout=300)

    [music] = stack.containers("music")
    pid = int(docker("inspect", "-f", "{{.State.Pid}}", music))
    restarts = int(docker("inspect", "-f", "{{.RestartCount}}", music))
    os.kill(pid, signal.SIGKILL)
    began = time.monotonic()
    while int(docker("inspect", "-f", "{{.RestartCount}}", music)) == restarts:
        if time.monotonic() - began > 120:
            raise SmokeFailed("the killed music container was not restarted by its policy")
        time.sleep(1)
    stack.wait_healthy(["music"], timeout=300)
    report.recovered_s = time.monotonic() - began
    done, _ = remix(video, work / "recovered.mp4")
    report.recovered_remix_ok = done.returncode == 0
    check(report, "a crashed service comes back by itself and serves", report.recovered_remix_ok,
          f"healthy again {report.recovered_s:.0f} s after SIGKILL")

    stack.compose("up", "-d", "--no-recreate", "--scale", "music=2")
    stack.wait_healthy(["music"], timeout=300, replicas=2)
    replicas = stack.containers("music")
    before = {c: generate_calls(c) for c in replicas}
    time.sleep(args.connection_age_s + 1)  # the gateway's old connection has been recycled
    failures = 0
    for i in range(8):
        done, _ = remix(video, work / f"scaled{i}.mp4")
        failures += done.returncode != 0
    names = {c: docker("inspect", "-f", "{{.Name}}", c).strip().lstrip("/") for c in replicas}
    report.per_replica = {names[c]: generate_calls(c) - before[c] for c in replicas}
    check(report, "8 remixes with music scaled to 2", failures == 0, f"{failures} failed")
    check(report, "each music replica serves at least 2 of 8", min(report.per_replica.values()) >= 2,
          str(report.per_replica))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compose_smoke", description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-build", action="store_true", help="use the images already built")
    parser.add_argument("--connection-age-s", type=float, default=5.0)
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    for tool in ("docker", "docker-compose", "ffmpeg"):
        if shutil.which(tool) is None:
            print(f"compose smoke: {tool} is not installed (see ../shared/containers/README.md)", file=sys.stderr)
            return 2
    if subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        print("compose smoke: no container engine answers (start dockerd)", file=sys.stderr)
        return 2
    report = Report()
    with tempfile.TemporaryDirectory(prefix="bgm-smoke-") as folder:
        work = Path(folder)
        override = work / "smoke.override.yml"
        override.write_text(OVERRIDE.format(age=args.connection_age_s))
        stack = Stack(override)
        try:
            run(args, report, stack, work)
        except SmokeFailed as exc:
            check(report, "smoke run", False, str(exc))
        finally:
            stack.compose("down", "-v", "--remove-orphans")
    print(json.dumps(asdict(report), indent=2))
    if args.json:
        args.json.write_text(json.dumps(asdict(report), indent=2))
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
