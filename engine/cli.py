"""`ringserve` command line: serve, stream (and the client tools as they arrive)."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

from engine.config import ConfigError, ServeConfig

log = logging.getLogger("ringserve")

SERVE_HELP = """\
Run the engine in the foreground until SIGINT/SIGTERM.

Every worker loads and warms the model before the daemon binds; the log then shows one
'ready' line with the endpoints, workers, model sha256 and onnxruntime version.
"""


SETTING_HELP = {
    "bind": "endpoint to listen on, repeatable: tcp://HOST:PORT or ipc:///path",
    "workers": "worker processes, each with its own onnxruntime session; 'auto': the workers of "
               "./ringserve.toml or $RINGSERVE_TUNED (written by `ringserve tune`), else the CPU count",
    "model": "ONNX model file (default: silero_vad.onnx from the silero-vad wheel)",
    "provider": "onnxruntime execution provider: auto (CUDA when present, else CPU), cpu, cuda, tensorrt",
    "intra_op_threads": "onnxruntime intra-op threads per worker",
    "max_streams": "streams the engine holds at once, all connections together",
    "max_batch": "most frames a worker runs in one batch (each worker runs one batch this large at start, "
                 "so its memory for the largest batch is taken then)",
    "batch_delay_us": "let the oldest queued frame wait up to this long for a fuller batch (the worker sleeps meanwhile); 0 runs whatever is ready",
    "busy_batch_delay_us": "the wait of a busy worker: it grows from batch_delay_us (model busy under 40 %% of the time) "
                           "to this (80 %% or more), trading latency for CPU per frame; never below batch_delay_us",
    "spin_us": "busy-wait this long for more work before blocking on a doorbell (the front-end only while its "
               "sleeps are shorter than two spins)",
    "ring_mib": "size of each worker's input ring (MiB)",
    "ready_timeout_s": "how long workers may take to load and warm the model",
    "max_message_bytes": "largest client message accepted",
    "max_items_per_message": "most audio items (chunks) one AUDIO message may hold; a message with more "
                             "is refused whole",
    "max_streams_per_connection": "streams one connection may hold (a gateway holds all of its own on one; "
                                  "lower it where several tenants share a daemon)",
    "max_in_flight_frames": "frames one stream may have queued in the engine, and chunks it may have "
                            "awaiting results",
    "idle_timeout_s": "close a stream that sent nothing for this long",
    "shed_after_ms": "overload policy: frames queued longer than this are shed (NaN result); 0 never sheds",
    "http": "also serve /live, /ready, /stats and /metrics over HTTP on HOST:PORT",
    "curve_secret_key": "server secret key file (*.key_secret): require ZeroMQ CURVE encryption + authentication",
    "curve_allow": "directory of client public keys (*.key) allowed to connect when CURVE is on",
    "insecure": "allow a non-loopback TCP bind without CURVE (logs a warning)",
    "log_level": "debug, info, warning or error",
    "log_format": "text or json",
}


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    from engine.settings import FIELDS, _kind

    defaults = ServeConfig().to_dict()
    p = sub.add_parser("serve", help="run the engine daemon", description=SERVE_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE.toml", help="read settings from a TOML file (flags and "
                   "RINGSERVE_* environment variables override it)")
    p.add_argument("--print-config", action="store_true", help="print the effective configuration and exit")
    for name in FIELDS:
        flag = "--" + name.replace("_", "-")
        kind = _kind(name)
        default = defaults[name]
        shown = ", ".join(default) if isinstance(default, list) else default
        help_text = f"{SETTING_HELP[name]} (default: {shown}; env RINGSERVE_{name.upper()})"
        if kind == "bool":
            p.add_argument(flag, dest=name, action="store_true", default=argparse.SUPPRESS, help=help_text)
        elif kind == "list":
            p.add_argument(flag, dest=name, action="append", metavar="ENDPOINT", default=argparse.SUPPRESS,
                           help=help_text)
        else:
            convert = _workers_arg if name == "workers" else {"int": int, "float": float}.get(kind, str)
            p.add_argument(flag, dest=name, type=convert, default=argparse.SUPPRESS,
                           metavar=name.upper(), help=help_text)
    p.set_defaults(func=cmd_serve)


def _workers_arg(text: str) -> int | str:
    """--workers N, or --workers auto (resolved in cmd_serve by engine.settings.auto_workers)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer or 'auto', got {text!r}") from None


def cmd_serve(args: argparse.Namespace) -> int:
    from engine.logs import setup_logging
    from engine.settings import FIELDS, auto_workers, build_config, to_toml

    flags = {name: getattr(args, name) for name in FIELDS if hasattr(args, name)}
    if "bind" in flags:
        flags["bind"] = tuple(flags["bind"])
    auto_note = None
    try:
        if flags.get("workers") == "auto":
            flags["workers"], auto_note = auto_workers()
        cfg, origin = build_config(flags, args.config)
    except ConfigError as exc:
        print(f"ringserve serve: {exc}", file=sys.stderr)
        return 2
    if auto_note is not None:
        origin["workers"] = f"--workers auto: {auto_note}"
    if args.print_config:
        print(to_toml(cfg, origin), end="")
        return 0
    setup_logging(cfg.log_level, cfg.log_format)
    if auto_note is not None:
        log.info("--workers auto: %d workers, from %s", cfg.workers, auto_note)
    from engine.daemon import Daemon

    try:
        Daemon(cfg).run()
    except (ConfigError, RuntimeError, FileNotFoundError, OSError) as exc:
        log.error("%s", exc)
        return 1
    return 0


def add_keys_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("keys", help="generate ZeroMQ CURVE key pairs",
                       description="Generate CURVE key pairs: NAME.key (public, share it) and NAME.key_secret "
                       "(private). The server needs its .key_secret (--curve-secret-key) and a directory holding "
                       "every allowed client's .key (--curve-allow); a client needs the server's .key and its own "
                       ".key_secret.")
    keys = p.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    gen = keys.add_parser("generate", help="write a key pair")
    gen.add_argument("--dir", default=".", help="directory to write into (default: current)")
    gen.add_argument("--name", default="server", help="file name stem (default %(default)s)")
    gen.set_defaults(func=cmd_keys_generate)


def cmd_keys_generate(args: argparse.Namespace) -> int:
    from transport.security import generate_keys

    public, secret = generate_keys(args.dir, args.name)
    print(f"public key: {public}\nsecret key: {secret} (keep it private)")
    return 0


def main(argv: list[str] | None = None) -> int:
    from bench.cli import add_bench_parser
    from clients.file_client import add_stream_parser
    from clients.mic import add_mic_parser
    from clients.status import add_status_parser

    parser = argparse.ArgumentParser(
        prog="ringserve",
        description="Shared-memory inference engine serving Silero VAD to many live audio streams.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_serve_parser(sub)
    add_stream_parser(sub)
    add_mic_parser(sub)
    add_status_parser(sub)
    add_keys_parser(sub)
    add_bench_parser(sub)
    __import__("bench.tune", fromlist=["add_tune_parser"]).add_tune_parser(sub)
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    return func(args)


if __name__ == "__main__":
    sys.exit(main())
