"""A data-plane worker process under the supervisor (``--workers N``).

It binds the public address with SO_REUSEPORT (the kernel spreads connections over the
workers), reads each new config as one JSON line on stdin, reports readiness on a status
pipe, and drains on SIGTERM exactly like a single process. EOF on stdin means the supervisor
is gone, so the worker drains and exits rather than linger as an orphan.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import sys
from typing import Any

from prometheus_client import CollectorRegistry

from .app import (
    Address,
    Settings,
    access_log_for,
    drain,
    install_stop_signals,
    public_tls,
    serve_public,
    watch_tls,
)
from .config import parse_config
from .metrics import Metrics
from .proxy.limits import Limits
from .proxy.server import ProxyServer

log = logging.getLogger(__name__)

SETTINGS_ENV = "CANARY_PROXY_WORKER_SETTINGS"


def settings_to_env(settings: Settings, *, port: int) -> str:
    return json.dumps(
        {
            "host": settings.listen.host,
            "port": port,
            "drain_delay": settings.drain_delay,
            "shutdown_timeout": settings.shutdown_timeout,
            "access_log": settings.access_log,
            "limits": dataclasses.asdict(settings.limits),
            "tls_cert": settings.tls_cert,
            "tls_key": settings.tls_key,
        }
    )


async def _read_configs(proxy: ProxyServer, stop: asyncio.Event, first: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=16 * 1024 * 1024)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        message: dict[str, Any] = json.loads(line)
        # The supervisor validated this config already; parsing it again cannot fail.
        proxy.apply(parse_config(message["config"]))
        # One line per worker and reload: shows (and lets tests await) that every worker
        # switched, since the supervisor's "config loaded" only means the config was sent.
        log.info("worker applied config", extra={"worker_pid": os.getpid()})
        first.set()
    log.warning("supervisor went away (stdin closed); draining")
    stop.set()


async def run_worker(status_fd: int) -> int:
    raw = json.loads(os.environ[SETTINGS_ENV])
    limits = raw["limits"]  # JSON has no tuples
    settings = Settings(
        listen=Address(raw["host"], raw["port"]),
        drain_delay=raw["drain_delay"],
        shutdown_timeout=raw["shutdown_timeout"],
        access_log=raw["access_log"],
        limits=Limits(**{**limits, "trust_forwarded_from": tuple(limits["trust_forwarded_from"])}),
        tls_cert=raw["tls_cert"],
        tls_key=raw["tls_key"],
    )
    tls = public_tls(settings)  # the supervisor loaded this pair already: an error is a crash
    metrics = Metrics(CollectorRegistry())  # values go to the shared multiprocess directory
    metrics.init_data_plane()
    proxy = ProxyServer(metrics=metrics, access_log=access_log_for(settings), limits=settings.limits)
    stop, first = asyncio.Event(), asyncio.Event()
    install_stop_signals(stop)
    reader = asyncio.create_task(_read_configs(proxy, stop, first))
    await first.wait()
    public = await serve_public(proxy, settings.listen, reuse_port=True, tls=tls)
    watcher = watch_tls(settings, tls)
    os.write(status_fd, b"ready\n")
    await stop.wait()
    await drain(public, proxy, drain_delay=settings.drain_delay, shutdown_timeout=settings.shutdown_timeout)
    background = [t for t in (reader, watcher) if t is not None]
    for task in background:
        task.cancel()
    await asyncio.gather(*background, return_exceptions=True)
    return 0


def main() -> None:
    from .cli import run_async
    from .logs import setup_logging
    from .memory import tune_malloc

    setup_logging(
        os.environ.get("CANARY_PROXY_LOG_FORMAT", "json"),
        os.environ.get("CANARY_PROXY_LOG_LEVEL", "info"),
    )
    status_fd = int(sys.argv[1])
    tune_malloc()  # each worker is a process of its own: see memory.py
    sys.exit(run_async(run_worker(status_fd)))


if __name__ == "__main__":
    main()
