"""Named POSIX shared-memory segments: created and owned by the daemon, attached by workers.

Ownership rule: only the creating process (the daemon) registers a segment with
multiprocessing's resource tracker. If the daemon is SIGKILLed, the tracker (a separate
process that outlives it until every inheritor of its pipe exits) unlinks the segment.
Workers attach by mmapping /dev/shm/<name> directly: on Python 3.11,
``SharedMemory(name)`` would register the segment again from the worker, and a worker that
exits would then have the tracker unlink a segment the daemon still uses (cpython gh-82300).

Every name carries the owner's pid and a random token (``ringserve-<pid>-<token>-...``), and
a daemon holds an flock on ``ringserve-<pid>-<token>.lock`` while it lives. A later daemon
removes exactly what a dead one left: the files of a lock it can take (the kernel drops a
lock with its holder, so this is right even when /dev/shm is shared across pid namespaces,
where pids lie). Segments with no lock file (tests, tools) fall back to a pid check.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import re
import secrets
from dataclasses import dataclass
from multiprocessing import shared_memory

SHM_DIR = "/dev/shm"
NAME_PREFIX = "ringserve-"
_NAME_RE = re.compile(r"^(ringserve-(\d+)-[0-9a-f]{8})[-.]")
_TOKEN = secrets.token_hex(4)


def owner_prefix() -> str:
    return f"{NAME_PREFIX}{os.getpid()}-{_TOKEN}"


def segment_name(purpose: str) -> str:
    return f"{owner_prefix()}-{purpose}"


class OwnerLock:
    """Held for the daemon's lifetime; its absence or availability marks leftovers as dead."""

    def __init__(self, shm_dir: str = SHM_DIR) -> None:
        self.path = os.path.join(shm_dir, owner_prefix() + ".lock")
        staging = self.path + ".new"
        self.fd = os.open(staging, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(staging, self.path)  # appears already locked: never mistaken for a dead owner's

    def release(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self.fd)


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
    def private(cls, size: int) -> Segment:
        """A segment in this process's own memory: a scratch ring that no other process sees."""
        return cls("private", size, memoryview(bytearray(size)), None, None)

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


def _lock_is_free(path: str) -> bool:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def remove_orphans(shm_dir: str = SHM_DIR) -> list[str]:
    """Unlink what dead owners left in ``shm_dir``; returns the names removed."""
    try:
        names = os.listdir(shm_dir)
    except FileNotFoundError:
        return []
    owners: dict[str, list[str]] = {}
    for name in names:
        match = _NAME_RE.match(name)
        if match is not None:
            owners.setdefault(match.group(1), []).append(name)
    removed = []
    for prefix, files in owners.items():
        lock = prefix + ".lock"
        if lock in files:
            dead = _lock_is_free(os.path.join(shm_dir, lock))
        else:
            dead = not _pid_alive(int(prefix.split("-")[1]))
        if not dead:
            continue
        for name in sorted(files, key=lambda n: n == lock):  # the lock goes last
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
