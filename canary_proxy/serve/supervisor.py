"""The supervisor for ``--workers N``: one control plane over N data-plane worker processes.

The supervisor owns the config source, the admin port and the control-plane metrics; each
validated config goes to every worker as one JSON line on its stdin, numbered by a
generation, so all workers switch together and a rejected config is counted once. Each
worker reports on its status pipe when it applied a generation and when it listens, and
``/config`` shows the oldest config a serving worker still applies: never one that not
every worker has taken yet. Workers share the public port through SO_REUSEPORT.
``/metrics`` sums every worker through prometheus_client's multiprocess mode (no ``pid``
label). A worker that dies is restarted, logged and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from prometheus_client import CollectorRegistry, multiprocess

from ..address import Address
from ..admin.app import AdminState, start_admin
from ..certs import Certificates
from ..control import ConfigControl, Routes
from ..metrics import Metrics
from ..runner import Exit
from ..sources.raw import RawConfig
from ..tls_store import TlsStore
from .lifecycle import HURRY_SIGNAL, Lifecycle
from .public import public_socket
from .settings import Settings
from .worker import SETTINGS_ENV

log = logging.getLogger(__name__)

RESTART_BACKOFF_MAX = 5.0  # seconds; a worker that crashes at once is not restarted hot
HURRY_BUDGET = 5.0  # seconds workers get to stop after a second Ctrl-C, before they are killed


@dataclass(slots=True)
class Worker:
    slot: int
    process: asyncio.subprocess.Process
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    applied: int | None = None  # the generation it last applied


class Supervisor:
    def __init__(self, settings: Settings, metrics: Metrics, port: int, tls_port: int | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.port = port
        self.tls_port = tls_port  # Ingress mode's HTTPS port, resolved once like ``port``
        self.tls_wire: dict[str, Any] | None = None  # the certificates last sent (Ingress mode)
        self.workers: dict[int, Worker] = {}
        self.generation = 0  # of the last config sent
        self.wire: list[dict[str, Any]] | None = None  # the routes last sent, as workers read them
        self.configs: dict[int, Routes] = {}  # by generation, from the oldest one still applied
        self.stopping = False
        self.restarts = 0
        self._tasks: set[asyncio.Task[None]] = set()

    def ready(self) -> bool:
        return (
            not self.stopping
            and len(self.workers) == self.settings.workers
            and all(w.ready.is_set() for w in self.workers.values())
        )

    def serving(self) -> Routes | None:
        """The oldest config a worker applies: what some requests may still get."""
        applied = [w.applied for w in self.workers.values() if w.applied is not None]
        return self.configs.get(min(applied)) if applied else None

    def broadcast(self, routes: Routes) -> None:
        self.generation += 1
        self.configs[self.generation] = routes
        self.wire = routes.to_wire()
        for worker in self.workers.values():
            self._send(worker)

    def broadcast_tls(self, certificates: Certificates) -> None:
        """Ingress mode: every worker serves the same certificates, sent as routes are (the
        PEM of each pair, once per change; a worker builds a context per new pair)."""
        self.tls_wire = certificates.to_wire()
        for worker in self.workers.values():
            self._send_tls(worker)

    def _send_tls(self, worker: Worker) -> None:
        self._write(worker, {"tls": self.tls_wire})

    def _send(self, worker: Worker) -> None:
        self._write(worker, {"generation": self.generation, "routes": self.wire})

    @staticmethod
    def _write(worker: Worker, message: dict[str, Any]) -> None:
        """One JSON line on the worker's stdin, the wire it reads routes and certificates from."""
        stdin = worker.process.stdin
        if stdin is not None and not stdin.is_closing():
            stdin.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")

    def _applied(self, worker: Worker, generation: int) -> None:
        worker.applied = generation
        oldest = min(w.applied for w in self.workers.values() if w.applied is not None)
        for old in [g for g in self.configs if g < oldest]:
            del self.configs[old]

    async def spawn(self, slot: int) -> Worker:
        read_fd, write_fd = os.pipe()
        listen = Address(self.settings.listen.host, self.port)  # port 0 resolved once, for all
        settings = replace(self.settings, listen=listen)
        if self.settings.tls_listen is not None and self.tls_port is not None:
            settings = replace(settings, tls_listen=Address(self.settings.tls_listen.host, self.tls_port))
        env = {**os.environ, SETTINGS_ENV: settings.to_json()}
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "canary_proxy.serve.worker",
                str(write_fd),
                stdin=asyncio.subprocess.PIPE,
                pass_fds=(write_fd,),
                env=env,
            )
        finally:
            os.close(write_fd)
        worker = Worker(slot, process)
        self.workers[slot] = worker
        if self.tls_wire is not None:  # before its first routes: it opens the HTTPS port with them
            self._send_tls(worker)
        if self.wire is not None:  # else it gets the first config when the source has one
            self._send(worker)
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
            while line := await reader.readline():  # "applied N" for each config, "ready" once
                word, _, generation = line.decode().partition(" ")
                if word == "applied":
                    self._applied(worker, int(generation))
                elif word.strip() == "ready":
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

    def _signal(self, sig: signal.Signals) -> None:
        for worker in self.workers.values():
            with contextlib.suppress(ProcessLookupError):
                worker.process.send_signal(sig)

    async def stop(self, life: Lifecycle) -> None:
        """Forward SIGTERM; each worker drains on its own. A second Ctrl-C is forwarded too.
        Kill whatever outlives the budget."""
        self.stopping = True
        self._signal(signal.SIGTERM)
        exited = asyncio.ensure_future(asyncio.gather(*(w.process.wait() for w in self.workers.values())))
        budget = self.settings.drain_delay + self.settings.shutdown_timeout + 5
        try:
            if not await life.unless_hurried(asyncio.wait_for(asyncio.shield(exited), budget)):
                self._signal(HURRY_SIGNAL)  # they skip what is left of their drain
                await asyncio.wait_for(asyncio.shield(exited), HURRY_BUDGET)
        except TimeoutError:
            log.error("workers did not exit in time; killing them")
            self._signal(signal.SIGKILL)
        await asyncio.gather(exited, return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def _announce_ready(
    supervisor: Supervisor, settings: Settings, port: int, admin: object, tls: TlsStore | None
) -> None:
    if tls is not None and not tls.listed:  # Ingress mode: the certificates loaded first
        listed = asyncio.Event()
        tls.on_listed.append(listed.set)
        await listed.wait()
    while not supervisor.ready():
        await asyncio.gather(*(w.ready.wait() for w in list(supervisor.workers.values())))
    ports = {"public": f"{settings.listen.host}:{port}", "admin": str(admin), "workers": settings.workers}
    if supervisor.tls_port is not None and settings.tls_listen is not None:
        ports["https"] = f"{settings.tls_listen.host}:{supervisor.tls_port}"
    log.info("ready", extra=ports)


async def run_supervisor(
    settings: Settings,
    *,
    initial: RawConfig | None,
    updates: Callable[[], AsyncIterator[RawConfig]],
    origin: str,
    tls: TlsStore | None = None,
) -> int:
    """As ``single.run_single``, over ``settings.workers`` worker processes."""
    directory = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    try:
        return await _supervise(settings, initial=initial, updates=updates, origin=origin, tls=tls)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


async def _supervise(
    settings: Settings,
    *,
    initial: RawConfig | None,
    updates: Callable[[], AsyncIterator[RawConfig]],
    origin: str,
    tls: TlsStore | None,
) -> int:
    metrics = Metrics(CollectorRegistry())  # written to the multiprocess directory
    metrics.init_control_plane()
    # Hold the port (bound, never listening, so it gets no connections) so that port 0
    # resolves once and every worker joins the same SO_REUSEPORT group.
    reservation = public_socket(settings.listen, reuse_port=True)
    port = reservation.getsockname()[1]
    reservations = [reservation]
    tls_port = None
    if tls is not None and settings.tls_listen is not None:
        try:
            reservations.append(public_socket(settings.tls_listen, reuse_port=True, flag="--tls-listen"))
        except BaseException:
            reservation.close()
            raise
        tls_port = reservations[-1].getsockname()[1]
    supervisor = Supervisor(settings, metrics, port, tls_port)
    if tls is not None:
        tls.metrics = metrics
        supervisor.broadcast_tls(tls.current)
        tls.on_change.append(supervisor.broadcast_tls)
    control = ConfigControl(metrics, [supervisor.broadcast])
    if initial is not None:
        control.offer(initial, origin=origin)
    scrape = CollectorRegistry()
    multiprocess.MultiProcessCollector(scrape)  # type: ignore[no-untyped-call]
    state = AdminState(
        control,
        scrape,
        lambda: supervisor.ready() and (tls is None or tls.listed),  # Ingress mode: Secrets listed too
        config_path=settings.config_path,
        serving=supervisor.serving,
    )
    try:
        async with Lifecycle() as life:
            admin, admin_address = await start_admin(state, settings.admin_listen)
            try:
                life.start(control.follow(updates(), origin=origin))
                for slot in range(settings.workers):
                    await supervisor.spawn(slot)
                if control.routes is None:
                    log.warning("waiting for a valid config from %s; /readyz is 503 until then", origin)
                # Workers listen only once they hold a config; announce when every one does.
                life.start(_announce_ready(supervisor, settings, port, admin_address, tls))
                await life.stop.wait()
                log.info("%s: /readyz is now 503; draining %d workers", life.signal_name, settings.workers)
                await supervisor.stop(life)
            finally:
                await admin.cleanup()
    finally:
        for held in reservations:
            held.close()
    return Exit.INTERRUPTED if life.hurry.is_set() else Exit.OK
