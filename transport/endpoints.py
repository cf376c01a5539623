"""Binding client-facing endpoints: ipc socket files, their permissions and stale leftovers."""

from __future__ import annotations

import errno
import os
import socket

import zmq


def ipc_path(endpoint: str) -> str | None:
    return endpoint[len("ipc://"):] if endpoint.startswith("ipc://") else None


def clear_stale_ipc(path: str) -> bool:
    """Remove an ipc socket file nobody listens on (a killed daemon's); True if removed.

    Raises if a live process is listening there, so two daemons never share an endpoint.
    """
    if not os.path.exists(path):
        return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOTSOCK, errno.ENOENT):
            raise
    else:
        raise RuntimeError(f"another process is already listening on ipc://{path}: stop it or choose another --bind")
    finally:
        probe.close()
    os.unlink(path)
    return True


def bind_all(socket_: zmq.Socket, endpoints: tuple[str, ...]) -> list[str]:
    """Bind every endpoint; ipc sockets are created owner-only (0600). Returns the ipc paths."""
    ipc_paths = []
    for endpoint in endpoints:
        path = ipc_path(endpoint)
        if path is not None:
            clear_stale_ipc(path)
            old_umask = os.umask(0o177)
            try:
                socket_.bind(endpoint)
            finally:
                os.umask(old_umask)
            ipc_paths.append(path)
        else:
            try:
                socket_.bind(endpoint)
            except zmq.ZMQError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise RuntimeError(f"{endpoint} is already in use: stop the other server or choose "
                                       "another --bind") from None
                raise
    return ipc_paths


def remove_ipc_files(paths: list[str]) -> None:
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
