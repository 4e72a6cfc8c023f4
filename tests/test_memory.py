"""The C allocator tuning (``bgm.memory``): large blocks freed by worker threads go back to
the system instead of staying in fragmented arenas."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# 100 blocks of 5 MiB made in a worker thread, each followed by a small object that lives on
# (as a long remix's blocks of audio and its bookkeeping do), then the blocks freed. Without
# the tuning glibc kept most of the 500 MiB resident here (its mmap threshold had risen to
# 8 MiB after one larger block was freed, so the blocks came from an arena it cannot trim).
SCRIPT = """
import os, threading, numpy as np
from pathlib import Path
from bgm import memory
def rss():
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024
assert memory.tune_allocator()
def work():
    big = np.ones(8 << 20, np.uint8); del big
    blocks, small = [], []
    for _ in range(100):
        blocks.append(np.ones(5 << 20, np.uint8))
        small.append(bytearray(64 * 1024))
    del blocks
before = rss()
t = threading.Thread(target=work); t.start(); t.join()
print(rss() - before)
"""


def test_large_blocks_freed_in_a_thread_leave_the_process():
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}  # no MALLOC_* of the caller's
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    kept_mib = float(done.stdout)
    assert kept_mib < 30, f"{kept_mib:.0f} MiB of 500 freed still resident"
