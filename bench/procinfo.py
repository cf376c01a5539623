"""What the benches read about processes and the machine: CPU seconds, run-queue wait and RSS
from /proc, the source version, machine facts. Linux only; every reader tolerates a process
that has just exited (it returns None or 0 rather than raising) unless told otherwise."""

from __future__ import annotations

import os
import platform
import resource
import subprocess
from pathlib import Path
from typing import Any

_CLK_TCK = os.sysconf("SC_CLK_TCK")
REPO = Path(__file__).resolve().parent.parent


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    """utime + stime of a whole process (all its threads), or of one thread, from /proc.
    Raises FileNotFoundError when the process is gone."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    with open(path) as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # fields 14 and 15 of proc(5)


def cpu_seconds_or_none(pid: int) -> float | None:
    try:
        return cpu_seconds(pid)
    except (OSError, ValueError, IndexError):
        return None


def machine_cpu_seconds() -> tuple[float, float, float] | None:
    """(busy, steal, nice): CPU seconds all cores spent busy since boot (/proc/stat: user, nice,
    system, irq, softirq), the seconds the hypervisor gave to other guests (steal), and the
    part of busy spent in processes with a positive niceness (they yield to everyone else),
    to set the bench's and the engine's CPU against the whole machine's."""
    try:
        with open("/proc/stat") as fh:
            fields = [int(v) for v in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    busy = fields[0] + fields[1] + fields[2] + fields[5] + fields[6]  # guest time is already in user
    steal = fields[7] if len(fields) > 7 else 0
    return busy / _CLK_TCK, steal / _CLK_TCK, fields[1] / _CLK_TCK


def autogroup_enabled() -> bool:
    """With CFS autogroups (the default on desktops and many VMs) a process's niceness only
    ranks it inside its session's group; groups share the CPUs as equals."""
    try:
        with open("/proc/sys/kernel/sched_autogroup_enabled") as fh:
            return fh.read().strip() == "1"
    except OSError:
        return False


def set_autogroup_nice(value: int) -> int | None:
    """Set the niceness of this process's autogroup (every process of its session); returns
    the previous value, None when there are no autogroups or it may not be changed."""
    try:
        with open("/proc/self/autogroup") as fh:
            previous = int(fh.read().split("nice")[1])
        with open("/proc/self/autogroup", "w") as fh:
            fh.write(str(value))
    except (OSError, ValueError, IndexError):
        return None
    return previous


def runq_wait_seconds(pid: int) -> float:
    """Time the process's main thread was runnable but waiting for a CPU (/proc/PID/schedstat)."""
    try:
        with open(f"/proc/{pid}/schedstat") as fh:
            return int(fh.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0  # kernel without schedstats, or the process is gone: reported as no wait


def rss_bytes(pid: int) -> int | None:
    """Resident set size (VmRSS of /proc/PID/status), None when the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def raise_nofile_limit() -> int:
    """Raise this process's open-file soft limit to its hard limit (children inherit it): a
    device-shaped load holds one connection per microphone. Returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= hard:
        return soft if soft != resource.RLIM_INFINITY else hard
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        return soft
    return hard


def source_version() -> str:
    """The commit measured, "+dirty" when engine/transport/clients/bench have local edits."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "engine", "transport", "clients", "bench"],
                               cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    import numpy
    import onnxruntime
    import zmq

    return {"source": source_version(), "cpus": os.cpu_count(), "cpu_model": cpu_model(),
            "affinity_cpus": len(os.sched_getaffinity(0)), "loadavg": list(os.getloadavg()),
            "python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
            "numpy": numpy.__version__, "zmq": zmq.zmq_version(), "pyzmq": zmq.pyzmq_version(),
            "kernel": platform.release(), "hostname": platform.node()}
