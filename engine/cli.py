"""`ringserve` command line: serve, stream (and the client tools as they arrive)."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

from engine.config import DEFAULT_BIND, ConfigError, ServeConfig

log = logging.getLogger("ringserve")

SERVE_HELP = """\
Run the engine in the foreground until SIGINT/SIGTERM.

Every worker loads and warms the model before the daemon binds; the log then shows one
'ready' line with the endpoints, workers, model sha256 and onnxruntime version.
"""


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    defaults = ServeConfig()
    p = sub.add_parser("serve", help="run the engine daemon", description=SERVE_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bind", action="append", metavar="ENDPOINT",
                   help=f"endpoint to listen on, repeatable: tcp://HOST:PORT or ipc:///path (default {DEFAULT_BIND})")
    p.add_argument("--workers", type=int, default=defaults.workers,
                   help="worker processes, each with its own onnxruntime session (default: CPU cores, %(default)s)")
    p.add_argument("--model", help="ONNX model file (default: silero_vad.onnx from the silero-vad wheel)")
    p.add_argument("--provider", choices=["auto", "cpu", "cuda", "tensorrt"], default=defaults.provider,
                   help="onnxruntime execution provider (default %(default)s)")
    p.add_argument("--intra-op-threads", type=int, default=defaults.intra_op_threads,
                   help="onnxruntime intra-op threads per worker (default %(default)s)")
    p.add_argument("--max-streams", type=int, default=defaults.max_streams,
                   help="streams the engine holds at once, all connections together (default %(default)s)")
    p.add_argument("--max-streams-per-connection", type=int, default=defaults.max_streams_per_connection,
                   help="streams one connection may hold (default %(default)s)")
    p.add_argument("--max-batch", type=int, default=defaults.max_batch,
                   help="most frames a worker runs in one batch (default %(default)s)")
    p.add_argument("--batch-delay-us", type=int, default=defaults.batch_delay_us,
                   help="wait up to this long for a fuller batch; 0 runs whatever is ready (default %(default)s)")
    p.add_argument("--spin-us", type=int, default=defaults.spin_us,
                   help="busy-wait this long for more work before blocking (default %(default)s)")
    p.add_argument("--ring-mib", type=int, default=defaults.ring_mib,
                   help="size of each worker's input ring in MiB (default %(default)s)")
    p.add_argument("--max-in-flight-frames", type=int, default=defaults.max_in_flight_frames,
                   help="frames one stream may have queued in the engine (default %(default)s)")
    p.add_argument("--max-message-bytes", type=int, default=defaults.max_message_bytes,
                   help="largest client message accepted (default %(default)s)")
    p.add_argument("--idle-timeout-s", type=float, default=defaults.idle_timeout_s,
                   help="close a stream that sent nothing for this long (default %(default)s)")
    p.add_argument("--ready-timeout-s", type=float, default=defaults.ready_timeout_s,
                   help="how long workers may take to load the model (default %(default)s)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default=defaults.log_level)
    p.add_argument("--log-format", choices=["text", "json"], default="text")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from engine.daemon import Daemon
    from engine.logs import setup_logging

    setup_logging(args.log_level, args.log_format)
    try:
        cfg = ServeConfig(
            bind=tuple(args.bind or (DEFAULT_BIND,)), workers=args.workers, model=args.model,
            provider=args.provider, intra_op_threads=args.intra_op_threads, max_streams=args.max_streams,
            max_streams_per_connection=args.max_streams_per_connection, max_batch=args.max_batch,
            batch_delay_us=args.batch_delay_us, spin_us=args.spin_us, ring_mib=args.ring_mib,
            max_in_flight_frames=args.max_in_flight_frames, max_message_bytes=args.max_message_bytes,
            idle_timeout_s=args.idle_timeout_s, ready_timeout_s=args.ready_timeout_s, log_level=args.log_level)
        Daemon(cfg).run()
    except (ConfigError, RuntimeError, FileNotFoundError) as exc:
        log.error("%s", exc)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    from clients.file_client import add_stream_parser

    parser = argparse.ArgumentParser(
        prog="ringserve",
        description="Shared-memory inference engine serving Silero VAD to many live audio streams.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_serve_parser(sub)
    add_stream_parser(sub)
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    return func(args)


if __name__ == "__main__":
    sys.exit(main())
