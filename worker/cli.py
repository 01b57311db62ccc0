"""``edgellm worker``: a rank daemon waiting for a coordinator to configure it.

torch and the gRPC service are imported when the worker runs, not when its arguments are
declared: ``edgellm --help`` and argument errors answer without loading torch (seconds on a Pi)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from worker.arguments import port_number, positive_int
from worker.memory.budget import size_argument

log = logging.getLogger("edgellm.worker")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="0.0.0.0", help="interface to listen on (default: all)")
    parser.add_argument("--port", type=port_number, default=50051, help="gRPC control port (default: 50051)")
    parser.add_argument("--cluster-token", default=os.environ.get("EDGELLM_CLUSTER_TOKEN", ""),
                        help="shared secret every peer must present (default: $EDGELLM_CLUSTER_TOKEN)")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch compute threads (default: all cores)")
    parser.add_argument("--memory-budget", type=size_argument, default=None, metavar="SIZE",
                        help="bytes for this rank's weights and KV cache, e.g. 2GiB; a larger shard streams "
                             "from disk through a sliding window (default: no budget, all resident)")
    parser.add_argument("--expert-cache", type=size_argument, default=None, metavar="SIZE",
                        help="bytes for routed experts of an MoE model (default: all resident)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="where model files fetched from the coordinator are kept (default: $EDGELLM_CACHE "
                             "or ~/.cache/edgellm)")


def _exit_with_parent(parent_pid: int) -> None:
    """A worker spawned by ``serve --local-workers`` must not outlive its coordinator."""
    import threading
    import time

    import psutil

    def watch() -> None:
        while psutil.pid_exists(parent_pid):
            time.sleep(1.0)
        log.warning("coordinator (pid %d) is gone; exiting", parent_pid)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def run(args: argparse.Namespace) -> int:
    import torch

    from worker.rank.service import DEFAULT_CACHE_DIR, serve

    if parent := os.environ.get("EDGELLM_PARENT_PID"):
        _exit_with_parent(int(parent))
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.cluster_token:
        log.warning("no cluster token (--cluster-token or $EDGELLM_CLUSTER_TOKEN): any coordinator that can "
                    "reach %s:%d can configure this worker", args.host, args.port)
    try:
        serve(args.host, args.port, args.cluster_token, args.memory_budget, args.expert_cache,
              args.cache_dir or DEFAULT_CACHE_DIR)
    except (OSError, RuntimeError) as exc:
        log.error("cannot start the worker: %s", exc)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="edgellm worker", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
