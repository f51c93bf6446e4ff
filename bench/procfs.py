"""What the kernel says about the servers and the machine: CPU time, memory, foreign load.

CPU time per request (from ``/proc/PID/stat``) is the bench's least noisy cost figure on a
shared machine; the machine-wide counters say how much *other* work ran meanwhile, i.e.
whether a run can be trusted at all. Linux only, read-only, no dependencies.
"""

from __future__ import annotations

import os
import platform
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def cpu_seconds(pid: int, main_thread: bool = False) -> float:
    """utime + stime of a process (all its threads) from /proc/PID/stat (fields 14 and 15), in
    seconds; with ``main_thread``, of its main thread only (the event loop's)."""
    path = f"/proc/{pid}/task/{pid}/stat" if main_thread else f"/proc/{pid}/stat"
    stat = Path(path).read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # the command name may contain spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class CpuSnapshot:
    """Machine-wide and own CPU time, to tell how much *other* work shared the machine.

    A shared 2-core box makes throughput swing by tens of percent when something else runs;
    reporting the foreign load next to the numbers says whether a run can be trusted.
    """

    wall: float
    busy: float  # all CPUs, user+nice+system+irq+softirq, seconds
    steal: float  # time the hypervisor gave to other guests
    own: float  # the servers under test + finished children (wrk) + this process

    @classmethod
    def take(cls, pids: list[int]) -> CpuSnapshot:
        ticks = os.sysconf("SC_CLK_TCK")
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        me = resource.getrusage(resource.RUSAGE_SELF)
        own = sum(cpu_seconds(p) for p in pids) + children.ru_utime + children.ru_stime
        return cls(
            wall=time.monotonic(),
            busy=(user + nice + system + irq + softirq) / ticks,
            steal=steal / ticks,
            own=own + me.ru_utime + me.ru_stime,
        )

    def background_since(self, start: CpuSnapshot) -> dict[str, float]:
        wall = self.wall - start.wall
        other = (self.busy - start.busy) - (self.own - start.own)
        return {
            "wall_s": wall,
            "other_cores": max(0.0, other / wall),
            "steal_cores": (self.steal - start.steal) / wall,
        }


_MEMORY_FIELDS = {
    "VmRSS": "rss_mb",
    "VmHWM": "peak_rss_mb",
    "RssAnon": "rss_anon_mb",
    "RssFile": "rss_file_mb",
}


def memory_mb(pid: int) -> dict[str, float]:
    """Current (VmRSS) and peak (VmHWM) resident memory in MB, and the current split into
    anonymous memory (the heap: what the process allocated) and file-backed pages (mostly
    shared libraries' code, which the kernel can drop and read back)."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in _MEMORY_FIELDS:
            out[_MEMORY_FIELDS[key]] = int(value.split()[0]) / 1024
    return out


def settle(pid: int, quiet_s: float = 0.15, max_s: float = 3.0) -> None:
    """Wait until the process has used (almost) no CPU for ``quiet_s``, so work it deferred
    past the end of the load (a background task) is counted in its round, not the next one."""
    deadline = time.monotonic() + max_s
    last = cpu_seconds(pid)
    while time.monotonic() < deadline:
        time.sleep(quiet_s)
        now = cpu_seconds(pid)
        if now - last <= 1.5 / os.sysconf("SC_CLK_TCK"):
            return
        last = now


def machine() -> dict[str, Any]:
    """CPU count and model, kernel: numbers without their machine mean little."""
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.partition(":")[2].strip()
            break
    return {"nproc": os.cpu_count(), "cpu": model, "kernel": platform.release()}
