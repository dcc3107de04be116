"""The supervisor for ``--workers N``: one control plane over N data-plane worker processes.

The supervisor owns the config source, the admin port and the control-plane metrics; each
validated config goes to every worker as one JSON line on its stdin, so all workers switch
together and a rejected config is counted once. Workers share the public port through
SO_REUSEPORT. ``/metrics`` sums every worker through prometheus_client's multiprocess mode
(no ``pid`` label). A worker that dies is restarted, logged and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, multiprocess

from .app import (
    AdminState,
    ConfigControl,
    Settings,
    dumps,
    install_stop_signals,
    public_socket,
    start_admin,
)
from .config import Config
from .metrics import Metrics
from .sources.file import RawConfig
from .worker import SETTINGS_ENV, settings_to_env

log = logging.getLogger(__name__)

RESTART_BACKOFF_MAX = 5.0  # seconds; a worker that crashes at once is not restarted hot


@dataclass(slots=True)
class Worker:
    slot: int
    process: asyncio.subprocess.Process
    ready: asyncio.Event = field(default_factory=asyncio.Event)


class Supervisor:
    def __init__(self, settings: Settings, metrics: Metrics, port: int) -> None:
        self.settings = settings
        self.metrics = metrics
        self.port = port
        self.workers: dict[int, Worker] = {}
        self.raw: dict[str, Any] | None = None
        self.stopping = False
        self.restarts = 0
        self._tasks: set[asyncio.Task[None]] = set()

    def ready(self) -> bool:
        return (
            not self.stopping
            and len(self.workers) == self.settings.workers
            and all(w.ready.is_set() for w in self.workers.values())
        )

    def broadcast(self, _config: Config, raw: dict[str, Any]) -> None:
        self.raw = raw
        for worker in self.workers.values():
            self._send(worker, raw)

    def _send(self, worker: Worker, raw: dict[str, Any]) -> None:
        stdin = worker.process.stdin
        if stdin is not None and not stdin.is_closing():
            stdin.write((dumps({"config": raw}) + "\n").encode())

    async def spawn(self, slot: int) -> Worker:
        read_fd, write_fd = os.pipe()
        env = dict(os.environ)
        env[SETTINGS_ENV] = settings_to_env(self.settings, port=self.port)
        env["CANARY_PROXY_LOG_FORMAT"] = self.settings.log_format
        env["CANARY_PROXY_LOG_LEVEL"] = self.settings.log_level
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "canary_proxy.worker",
                str(write_fd),
                stdin=asyncio.subprocess.PIPE,
                pass_fds=(write_fd,),
                env=env,
            )
        finally:
            os.close(write_fd)
        worker = Worker(slot, process)
        self.workers[slot] = worker
        if self.raw is not None:  # else it gets the first config when the source has one
            self._send(worker, self.raw)
        task = asyncio.create_task(self._watch(worker, read_fd))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return worker

    async def _watch(self, worker: Worker, read_fd: int) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        status = os.fdopen(read_fd, "rb", buffering=0)
        transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), status)
        try:
            if await reader.readline() == b"ready\n":
                worker.ready.set()
            code = await worker.process.wait()
        finally:
            transport.close()
        multiprocess.mark_process_dead(worker.process.pid)  # type: ignore[no-untyped-call]
        if self.stopping:
            return
        self.metrics.worker_restarts.inc()
        log.error(
            "worker %d (pid %d) exited with %s; restarting it",
            worker.slot,
            worker.process.pid,
            code,
        )
        self.restarts += 1
        await asyncio.sleep(min(RESTART_BACKOFF_MAX, 0.05 * 2 ** min(10, self.restarts)))
        if not self.stopping:
            await self.spawn(worker.slot)

    async def stop(self) -> None:
        """Forward SIGTERM; each worker drains on its own. Kill whatever outlives the budget."""
        self.stopping = True
        for worker in self.workers.values():
            with contextlib.suppress(ProcessLookupError):
                worker.process.send_signal(signal.SIGTERM)
        budget = self.settings.drain_delay + self.settings.shutdown_timeout + 5
        waits = [w.process.wait() for w in self.workers.values()]
        try:
            await asyncio.wait_for(asyncio.gather(*waits), budget)
        except TimeoutError:
            log.error("workers did not exit within %.0fs; killing them", budget)
            for worker in self.workers.values():
                with contextlib.suppress(ProcessLookupError):
                    worker.process.kill()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def _announce_ready(supervisor: Supervisor, settings: Settings, port: int, admin: object) -> None:
    while not supervisor.ready():
        await asyncio.gather(*(w.ready.wait() for w in list(supervisor.workers.values())))
    public = f"{settings.listen.host}:{port}"
    log.info("ready", extra={"public": public, "admin": str(admin), "workers": settings.workers})


async def run_supervisor(
    settings: Settings,
    *,
    initial: RawConfig | None,
    updates: Callable[[], AsyncIterator[RawConfig]],
    origin: str,
) -> int:
    directory = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    try:
        return await _supervise(settings, initial=initial, updates=updates, origin=origin)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


async def _supervise(
    settings: Settings,
    *,
    initial: RawConfig | None,
    updates: Callable[[], AsyncIterator[RawConfig]],
    origin: str,
) -> int:
    metrics = Metrics(CollectorRegistry())  # written to the multiprocess directory
    metrics.init_control_plane()
    # Hold the port (bound, never listening, so it gets no connections) so that port 0
    # resolves once and every worker joins the same SO_REUSEPORT group.
    reservation = public_socket(settings.listen, reuse_port=True)
    port = reservation.getsockname()[1]
    supervisor = Supervisor(settings, metrics, port)
    control = ConfigControl(metrics, [supervisor.broadcast])
    if initial is not None and not control.offer(initial, origin=origin):
        return 2
    stop = asyncio.Event()
    install_stop_signals(stop)
    scrape = CollectorRegistry()
    multiprocess.MultiProcessCollector(scrape)  # type: ignore[no-untyped-call]
    admin, admin_address = await start_admin(
        AdminState(control, scrape, supervisor.ready, config_path=settings.config_path),
        settings.admin_listen,
    )
    follower = asyncio.create_task(control.follow(updates(), origin=origin))
    for slot in range(settings.workers):
        await supervisor.spawn(slot)
    if control.current is None:
        log.warning("waiting for a valid config from %s; /readyz is 503 until then", origin)
    # Workers listen only once they hold a config; announce when every one of them does.
    announce = asyncio.create_task(_announce_ready(supervisor, settings, port, admin_address))
    try:
        await stop.wait()
        log.info("SIGTERM: /readyz is now 503; draining %d workers", settings.workers)
        await supervisor.stop()
    finally:
        for task in (follower, announce):
            task.cancel()
        await asyncio.gather(follower, announce, return_exceptions=True)
        await admin.cleanup()
        reservation.close()
    return 0
