"""A data-plane worker process under the supervisor (``--workers N``).

It binds the public address with SO_REUSEPORT (the kernel spreads connections over the
workers), reads each new config as one JSON line on stdin, reports on a status pipe each
generation it applied and when it listens, and drains on SIGTERM exactly like a single
process. EOF on stdin means the supervisor is gone, so the worker drains and exits rather
than linger as an orphan.

Run by the supervisor as ``python -m canary_proxy.serve.worker STATUS_FD``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from typing import Any

from prometheus_client import CollectorRegistry

from ..config import Config
from ..control import Routes
from ..logs import setup_logging
from ..memory import tune_malloc
from ..metrics import Metrics
from ..proxy.server import ProxyServer
from ..runner import Exit, run_async
from .lifecycle import Lifecycle
from .public import access_log_for, drain, public_tls, serve_public, watch_tls
from .settings import Settings

log = logging.getLogger(__name__)

SETTINGS_ENV = "CANARY_PROXY_WORKER_SETTINGS"  # Settings.to_json(), from the supervisor


async def _read_configs(
    proxy: ProxyServer, life: Lifecycle, status_fd: int, first: asyncio.Event, fallback: Config | None
) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=16 * 1024 * 1024)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        message: dict[str, Any] = json.loads(line)
        # The supervisor validated these routes already; parsing them again cannot fail.
        proxy.apply_routes(Routes.from_wire(message["routes"]).routes, fallback=fallback)
        os.write(status_fd, f"applied {message['generation']}\n".encode())
        # One line per worker and reload: shows (and lets tests await) that every worker
        # switched, since the supervisor's "config loaded" only means the config was sent.
        log.info(
            "worker applied config",
            extra={"worker_pid": os.getpid(), "generation": message["generation"]},
        )
        first.set()
    log.warning("supervisor went away (stdin closed); draining")
    life.stop.set()


async def run_worker(settings: Settings, status_fd: int) -> int:
    tls = public_tls(settings)  # the supervisor loaded this pair already: an error is a crash
    # Values go to the shared multiprocess directory, the nginx families' too.
    metrics = Metrics(CollectorRegistry(), nginx=settings.nginx_metrics)
    metrics.init_data_plane(route=None)  # each route's series come with it: ProxyServer.apply_routes
    proxy = ProxyServer(metrics=metrics, access_log=access_log_for(settings), limits=settings.limits)
    async with Lifecycle() as life:
        first = asyncio.Event()
        life.start(_read_configs(proxy, life, status_fd, first, settings.default_backend_config()))
        await _first_of(first, life.stop)
        if life.stop.is_set():  # stopped before it ever had a config: nothing to drain
            return Exit.OK
        public = await serve_public(proxy, settings.listen, reuse_port=True, tls=tls)
        watch_tls(life, settings, tls)
        os.write(status_fd, b"ready\n")
        await life.stop.wait()
        await drain(public, proxy, settings, life)
    return Exit.INTERRUPTED if life.hurry.is_set() else Exit.OK


async def _first_of(*events: asyncio.Event) -> None:
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()
        await asyncio.gather(*waits, return_exceptions=True)


def main() -> None:
    settings = Settings.from_json(os.environ[SETTINGS_ENV])
    setup_logging(settings.log_format, settings.log_level)
    status_fd = int(sys.argv[1])
    tune_malloc()  # each worker is a process of its own: see memory.py
    sys.exit(run_async(run_worker(settings, status_fd)))


if __name__ == "__main__":
    main()
