"""Files whose container header lies about their length, sent to a gateway process on its
own (as a deployment runs it): how soon they are refused and the process's peak memory.

The four services are stand-ins that only answer health checks: a lying file must be
refused at the gateway before any of them is called. The limit is set to 60 s. (A header
that overstates is tested in tests/test_hardening.py: the remix is as long as the audio.)

    python -m bench.lying_headers [--minutes 30]
"""

from __future__ import annotations

import argparse
import asyncio
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc

from bgm import vocab
from bgm.chunks import iter_file_chunks
from bgm.server import ModelServicer, start_server
from bgm.settings import ServerSettings
from bgm.v1 import gateway_pb2, gateway_pb2_grpc
from tests.processes import spawn

LIMIT_S = 60


class Standin(ModelServicer):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.service_name = name

    def add_to_server(self, server: object) -> None:
        pass


def lying_mkv(path: Path, seconds: float, claimed_s: float) -> Path:
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i",
                    f"sine=frequency=300:duration={seconds}:sample_rate=8000", "-c:a", "pcm_s16le", str(path)],
                   check=True)
    data = bytearray(path.read_bytes())
    at = data.find(b"\x44\x89\x88")  # Segment Info's Duration, 8-byte float in ms
    data[at + 3 : at + 11] = struct.pack(">d", claimed_s * 1000)
    path.write_bytes(bytes(data))
    return path


def peak_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.lying_headers")
    parser.add_argument("--minutes", type=float, default=30.0, help="real length of the lying file")
    args = parser.parse_args()
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    standins = asyncio.run_coroutine_threadsafe(start_server(
        [Standin(s.grpc_name) for s in vocab.BACKEND_SERVICES], ServerSettings()), loop).result()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        env = {f"BGM_GATEWAY_{s.name.upper()}_ADDRESS": standins.address for s in vocab.BACKEND_SERVICES}
        env["BGM_GATEWAY_MAX_DURATION_S"] = str(LIMIT_S)
        gateway = spawn("gateway", [sys.executable, "-m", "gateway"], env, work)
        try:
            gateway.wait_serving()
            idle = peak_mib(gateway.popen.pid)
            stub = gateway_pb2_grpc.GatewayStub(grpc.insecure_channel(gateway.address))
            cases = [(f"{m:g} min of audio, header says 2 s", m * 60, 2.0) for m in (2, args.minutes)]
            print(f"gateway alone, idle: peak {idle:.0f} MiB; limit {LIMIT_S} s")
            print("| file | size | answer | seconds after the upload | gateway peak (MiB) |")
            print("|---|---|---|---|---|")
            for name, seconds, claimed in cases:
                path = lying_mkv(work / "lying.mkv", seconds, claimed)

                def requests(p: Path = path):
                    yield gateway_pb2.RemixRequest(options=gateway_pb2.RemixOptions(filename="lying.mkv"))
                    yield from (gateway_pb2.RemixRequest(video=c) for c in iter_file_chunks(p))

                uploaded = None
                answer = "OK"
                try:
                    for event in stub.Analyze(requests(), timeout=600):
                        if event.WhichOneof("event") == "progress" and event.progress.fraction == 1.0 \
                                and uploaded is None:
                            uploaded = time.monotonic()
                except grpc.RpcError as exc:
                    answer = f"{exc.code().name}: {exc.details()[:60]}"
                after = time.monotonic() - (uploaded or time.monotonic())
                print(f"| {name} | {path.stat().st_size / 2**20:.1f} MiB | {answer} | {after:.2f} | "
                      f"{peak_mib(gateway.popen.pid):.0f} |")
        finally:
            gateway.stop()
    asyncio.run_coroutine_threadsafe(standins.stop(0), loop).result()


if __name__ == "__main__":
    main()
