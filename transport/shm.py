"""Named POSIX shared-memory segments: created and owned by the daemon, attached by workers.

Ownership rule: only the creating process (the daemon) registers a segment with
multiprocessing's resource tracker. If the daemon is SIGKILLed, the tracker (a separate
process that outlives it until every inheritor of its pipe exits) unlinks the segment.
Workers attach by mmapping /dev/shm/<name> directly: on Python 3.11,
``SharedMemory(name)`` would register the segment again from the worker, and a worker that
exits would then have the tracker unlink a segment the daemon still uses (cpython gh-82300).

Every name carries the daemon's pid (``ringserve-<pid>-...``), so a later daemon can tell
what a dead one left behind and remove exactly that (see ``remove_orphans``).
"""

from __future__ import annotations

import mmap
import os
import re
from dataclasses import dataclass
from multiprocessing import shared_memory

SHM_DIR = "/dev/shm"
NAME_PREFIX = "ringserve-"
_NAME_RE = re.compile(r"^ringserve-(\d+)-")


def segment_name(purpose: str, pid: int | None = None) -> str:
    return f"{NAME_PREFIX}{os.getpid() if pid is None else pid}-{purpose}"


@dataclass
class Segment:
    """A mapped segment. ``buf`` stays valid until ``close()``."""

    name: str
    size: int
    buf: memoryview
    _owner: shared_memory.SharedMemory | None
    _mmap: mmap.mmap | None

    @classmethod
    def create(cls, name: str, size: int) -> Segment:
        shm = shared_memory.SharedMemory(name=name, create=True, size=size)
        assert shm.buf is not None
        return cls(name, size, shm.buf, shm, None)

    @classmethod
    def attach(cls, name: str) -> Segment:
        fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        return cls(name, size, memoryview(mm), None, mm)

    def close(self) -> None:
        """Unmap. Every numpy view or memoryview slice of ``buf`` must be gone first."""
        self.buf.release()
        if self._owner is not None:
            self._owner.close()
        elif self._mmap is not None:
            self._mmap.close()

    def unlink(self) -> None:
        if self._owner is not None:
            try:
                self._owner.unlink()
            except FileNotFoundError:
                pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_orphans(shm_dir: str = SHM_DIR) -> list[str]:
    """Unlink segments whose daemon pid no longer exists; returns the names removed."""
    removed: list[str] = []
    try:
        names = os.listdir(shm_dir)
    except FileNotFoundError:
        return removed
    for name in names:
        match = _NAME_RE.match(name)
        if match is None or _pid_alive(int(match.group(1))):
            continue
        try:
            os.unlink(os.path.join(shm_dir, name))
            removed.append(name)
        except FileNotFoundError:
            pass
    return removed


def check_free_space(needed: int, shm_dir: str = SHM_DIR) -> None:
    """Fail early with the fix named, instead of a SIGBUS on first touch of a full /dev/shm."""
    stat = os.statvfs(shm_dir)
    free = stat.f_bavail * stat.f_frsize
    if free < needed:
        raise RuntimeError(
            f"{shm_dir} has {free // 2**20} MiB free but ringserve needs {needed // 2**20} MiB: "
            "lower --max-streams/--ring-mib, or give the container more shared memory "
            "(docker --shm-size, or --ipc=host)"
        )
