"""ZeroMQ CURVE: encryption and client authentication for engines reachable from the network.

Policy: loopback TCP and ipc binds need nothing. A TCP bind on any other address needs
CURVE (a server secret key and a directory of allowed client public keys) or an explicit
``--insecure``. CURVE applies to the ROUTER socket as a whole, so once it is on, every
client, local ones too, needs a key pair. Keys are the standard ZeroMQ certificate files
written by ``ringserve keys generate`` (zmq.auth.create_certificates).
"""

from __future__ import annotations

import ipaddress
import logging
import os
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

log = logging.getLogger("ringserve.security")


class SecurityError(RuntimeError):
    pass


def is_loopback(endpoint: str) -> bool:
    if not endpoint.startswith("tcp://"):
        return True  # ipc:// and inproc:// never leave the machine
    host = endpoint[len("tcp://"):].rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name or '*': may be reachable from anywhere


def check_binds(endpoints: tuple[str, ...], curve_enabled: bool, insecure: bool) -> None:
    exposed = [e for e in endpoints if not is_loopback(e)]
    if not exposed or curve_enabled:
        return
    if insecure:
        log.warning("serving %s WITHOUT encryption or authentication (--insecure): anyone who can reach it "
                    "can use the engine", ", ".join(exposed))
        return
    raise SecurityError(f"{', '.join(exposed)} is reachable from other machines: enable CURVE with "
                        "--curve-secret-key FILE and --curve-allow DIR (see `ringserve keys generate`), "
                        "or pass --insecure to serve it unencrypted")


def enable_server_curve(context: zmq.Context, socket: zmq.Socket, secret_key_file: str,
                        allow_dir: str) -> ThreadAuthenticator:
    """Make ``socket`` a CURVE server that admits only the public keys found in ``allow_dir``."""
    if not os.path.isdir(allow_dir) or not list(Path(allow_dir).glob("*.key")):
        raise SecurityError(f"--curve-allow {allow_dir}: no client public keys (*.key) there; "
                            "copy each client's .key file into it")
    public, secret = zmq.auth.load_certificate(secret_key_file)
    if secret is None:
        raise SecurityError(f"--curve-secret-key {secret_key_file} holds no secret key: use the *.key_secret file")
    auth = ThreadAuthenticator(context)
    auth.start()
    auth.configure_curve(domain="*", location=allow_dir)
    socket.curve_secretkey = secret
    socket.curve_publickey = public
    socket.curve_server = True
    return auth


def enable_client_curve(socket: zmq.Socket, server_public_key_file: str, client_secret_key_file: str) -> None:
    server_public, _ = zmq.auth.load_certificate(server_public_key_file)
    client_public, client_secret = zmq.auth.load_certificate(client_secret_key_file)
    if client_secret is None:
        raise SecurityError(f"{client_secret_key_file} holds no secret key: use the client's *.key_secret file")
    socket.curve_serverkey = server_public
    socket.curve_publickey = client_public
    socket.curve_secretkey = client_secret


def generate_keys(directory: str, name: str) -> tuple[str, str]:
    """Write NAME.key (public, shareable) and NAME.key_secret (keep private, 0600)."""
    os.makedirs(directory, exist_ok=True)
    public, secret = zmq.auth.create_certificates(directory, name)
    os.chmod(secret, 0o600)
    return str(public), str(secret)
