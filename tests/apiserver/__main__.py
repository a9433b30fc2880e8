"""Run the fake API server in its own process (for benchmarks and manual testing).

    python -m tests.apiserver --port 0 --kubeconfig /tmp/kc.yaml [--load FILE ...] [--token T]

Prints one JSON line {"url", "kubeconfig", "ca", "port"} once ready, then serves until
SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import gc
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

import orjson

from .loader import read_objects
from .server import FakeApiServer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.apiserver", description=__doc__)
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--host", default="127.0.0.1", choices=["127.0.0.1", "::1"])
    parser.add_argument("--kubeconfig", type=Path, required=True, help="where to write it")
    parser.add_argument("--token", default="t0k3n")
    parser.add_argument(
        "--load",
        type=Path,
        action="extend",
        nargs="+",
        default=[],
        help="multi-document YAML or JSON (list or List) files of objects to create",
    )
    parser.add_argument("--history-limit", type=int, default=10_000)
    parser.add_argument("--bookmark-interval", type=float, default=1.0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    done = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server = FakeApiServer(
        token=args.token,
        port=args.port,
        history_limit=args.history_limit,
        bookmark_interval=args.bookmark_interval,
        host=args.host,
    )
    try:
        for path in args.load:
            server.load(read_objects(path))  # before start: no loop hop, no watchers
        # The loaded objects live until exit: collect the loading's garbage once, then keep
        # them out of every later collection. Otherwise a full collection walks all of them
        # (hundreds of ms at 10,000 Services) in the middle of a benchmark's write.
        gc.collect()
        gc.freeze()
        server.start()
        kubeconfig = server.write_kubeconfig(args.kubeconfig)
        ready = {
            "url": server.url,
            "kubeconfig": str(kubeconfig),
            "ca": str(server.ca_path),
            "port": server.port,
        }
        sys.stdout.write(orjson.dumps(ready).decode() + "\n")
        sys.stdout.flush()
        # Wake up now and then: Event.wait is not interrupted by signals on every platform.
        while not done.wait(timeout=0.5):
            pass
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
