"""``canary-proxy demo``: a whole canary rollout on loopback in about a minute, nothing else needed.

One command starts, in this process unless said otherwise:

- two built-in apps, stable ``v1`` and canary ``v2`` (``--bad-canary errors|latency`` makes
  v2 fail once the proxy serves it ``--fail-at`` percent of traffic);
- the real proxy, ``canary-proxy serve --config FILE``, as its own process;
- a traffic generator: sticky browser-like users who keep their cookie (and come and go),
  and a few QA users who send ``X-Canary: always``;
- the rollout controller in file mode through 5,10,25,50,100, analysing the proxy's own
  ``/metrics`` exactly as ``canary-proxy rollout --config FILE --metrics-url ...`` does.

With ``--services 2`` there are two such services, ``shop`` and ``blog``, each its own
stable/canary pair, traffic and rollout, behind the one proxy: ``serve --config-dir DIR``
with a route file each, routed by Host (``shop.localhost``, ``blog.localhost``). Each
rollout drives its own file and analyses its own route's series; ``--bad-canary`` breaks
the first service's canary only.

``view`` shows it: a live view in a terminal, plain progress lines otherwise. The exit
code is the rollout's: 0 promoted, 1 rolled back (with several: 0 when every one promoted,
1 when any rolled back); 128 + N when stopped by signal N (130 for Ctrl-C); 2 when it
cannot start (a port in use).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import aiohttp
import yaml

from ..rollout.analysis import Thresholds
from ..rollout.controller import Controller
from ..rollout.decide import STOPPED, Settings
from ..rollout.plan import Plan, describe, parse_plan
from ..rollout.sources import ScrapeSource
from ..rollout.store import FileStore
from ..router import CANARY, STABLE
from ..runner import Exit, print_errors, signalled
from .apps import DemoApp, Fault
from .model import CheckRow, DemoModel, DemoOptions, ServiceModel, version_now
from .process import ProxyProcess, StartError, check_free, start_proxy
from .traffic import HEADER, Traffic
from .view import View, make_view

log = logging.getLogger(__name__)

STEPS: Final = "5,10,25,50,100"

# Clocks at --speed 1: five steps of 12 s with a check every 2 s make about a minute. Six
# checks a step leave room to catch a canary that breaks mid-step before the step ends.
STEP_DURATION: Final = 12.0
INTERVAL: Final = 2.0
PROGRESS_DEADLINE: Final = 30.0
MIN_REQUESTS: Final = 10  # per check, up to --speed 2.5; fewer when checks come faster (never < 3)
STATS_POLL: Final = 0.5  # seconds between two reads of the admin port's /stats


def controller_settings(options: DemoOptions, plan: Plan) -> Settings:
    return Settings(
        plan=plan,
        step_duration=STEP_DURATION / options.speed,
        interval=INTERVAL / options.speed,
        window=INTERVAL / options.speed,  # ignored by a scraping source; kept honest
        failure_threshold=2,
        progress_deadline=PROGRESS_DEADLINE / options.speed,
        thresholds=Thresholds(min_requests=max(3, min(MIN_REQUESTS, round(25 / options.speed)))),
    )


# The service whose controller is logging: each rollout runs in its own task, which sets it.
SERVICE: contextvars.ContextVar[int] = contextvars.ContextVar("demo_service", default=0)


class _Records(logging.Handler):
    """Hands the controller's log records (decisions and checks, with their numbers) to the demo."""

    def __init__(self, demo: Demo) -> None:
        super().__init__(logging.INFO)
        self.demo = demo

    def emit(self, record: logging.LogRecord) -> None:
        self.demo.on_record(record, SERVICE.get())


@contextlib.contextmanager
def _capture_controller_logs(demo: Demo) -> Iterator[None]:
    logger = logging.getLogger("canary_proxy.rollout")
    saved = logger.level, logger.propagate
    handler = _Records(demo)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # the view shows them; nothing else writes to the terminal
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


@dataclass
class Service:
    """One service as it runs: its two apps, its config file, its traffic, and what the views show."""

    model: ServiceModel
    fault: Fault
    stable: DemoApp
    canary: DemoApp
    config_path: Path
    traffic: Traffic | None = None

    @property
    def route(self) -> str:
        return self.model.name

    def config(self) -> dict[str, Any]:
        """Its config file: the flat config of today, plus the route keys with several."""
        keys = {"name": self.model.name, "host": self.model.host} if self.model.host else {}
        return {
            **keys,
            "stable-url": self.stable.url,
            "canary-url": self.canary.url,
            "canary-weight": 0,
            "canary-by-header": HEADER,
        }


class Demo:
    def __init__(self, options: DemoOptions, view: View) -> None:
        self.options = options
        self.plan = parse_plan(STEPS)
        self.model = DemoModel(options, self.plan)
        self.view = view
        self.services: list[Service] = []

    def on_record(self, record: logging.LogRecord, index: int = 0) -> None:
        model, message = self.model, record.getMessage()
        service = model.services[index]
        warning = record.levelno >= logging.WARNING
        check = getattr(record, "check", None)
        step = getattr(record, "step", None)
        where = describe(self.plan, step) if isinstance(step, int) and 0 <= step < len(self.plan) else "-"
        if isinstance(check, dict):
            row = CheckRow(
                model.elapsed,
                where.removeprefix("step "),
                str(check.get("result")),
                check.get("canary") or {},
                check.get("stable") or {},
                [str(r) for r in check.get("reasons", [])],
                model.about(service, message),
            )
            service.checks.append(row)
            self.view.check(model, row)
            return
        if message.startswith("stopped by signal"):
            return  # the controller's hint to resume does not apply: the demo's files go with it
        phase = getattr(record, "phase", None)
        if phase:
            service.phase = str(phase)
            service.step = where.removeprefix("step ")
        self.note(model.about(service, message), warning=warning)

    def note(self, text: str, *, warning: bool = False) -> None:
        self.model.events.append((self.model.elapsed, text, warning))
        self.view.event(self.model, text, warning=warning)

    async def watch(self, session: aiohttp.ClientSession, admin: str) -> None:
        """Read the proxy's /stats twice a second, each service's route: the weight it serves
        and each version's numbers."""
        while True:
            for service in self.services:
                query = f"?route={service.route}" if self.model.several else ""
                try:
                    async with session.get(admin + "/stats" + query) as response:
                        stats = await response.json()
                except (aiohttp.ClientError, TimeoutError, ValueError):
                    stats = None
                if isinstance(stats, dict):
                    self._seen(service, stats)
            self.view.tick(self.model)
            await asyncio.sleep(STATS_POLL)

    def _seen(self, service: Service, stats: dict[str, Any]) -> None:
        model = service.model
        if stats.get("weight") is not None:
            model.weight = float(stats["weight"]["percent"])
            if service.fault.reached(model.weight):
                model.fault_active = True
                self.note(
                    self.model.about(
                        model,
                        f"canary v2 starts failing now (--bad-canary {service.fault.mode}): the proxy "
                        f"serves it {model.weight:g}% >= --fail-at {self.options.fail_at:g}%",
                    ),
                    warning=True,
                )
        for version in (STABLE, CANARY):
            model.versions[version] = version_now(stats.get("series", {}), version)
        totals = stats.get("totals") or {}
        model.served = {v: float(totals.get(v, {}).get("requests", 0)) for v in (STABLE, CANARY)}
        if service.traffic is not None:
            on = service.traffic.on_version
            model.users = Counter({k: v for k, v in on.items() if v > 0})

    async def run(self, stop: asyncio.Event) -> int:
        check_free(self.options.port, "--port")
        check_free(self.options.admin_port, "--admin-port")
        workdir = Path(tempfile.mkdtemp(prefix="canary-proxy-demo-"))
        several = self.model.several
        routes = workdir / "routes"
        for model in self.model.services:
            fault = Fault(model.bad_canary, self.options.fail_at)
            label = model.name if several else "demo"
            path = routes / f"{model.name}.yaml" if several else workdir / "canary.yaml"
            self.services.append(
                Service(model, fault, DemoApp("v1", app=label), DemoApp("v2", fault, app=label), path)
            )
        try:
            async with contextlib.AsyncExitStack() as stack:
                for service in self.services:
                    for app in (service.stable, service.canary):
                        await app.start()
                        stack.push_async_callback(app.stop)
                    service.config_path.parent.mkdir(exist_ok=True)
                    service.config_path.write_text(yaml.safe_dump(service.config(), sort_keys=False))
                source = (
                    ["--config-dir", str(routes)]
                    if several
                    else ["--config", str(self.services[0].config_path)]
                )
                proxy = await start_proxy(source, port=self.options.port, admin_port=self.options.admin_port)
                stack.push_async_callback(proxy.stop)
                self.model.urls = self._urls(proxy, source[1])
                self.view.start(self.model)
                return await self._rollout(stack, proxy, stop)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def _urls(self, proxy: ProxyProcess, config: str) -> dict[str, str]:
        urls = {}
        for service in self.services:
            prefix = f"{service.route} " if self.model.several else ""
            urls[f"{prefix}stable v1"] = service.stable.url
            urls[f"{prefix}canary v2"] = service.canary.url
        return {
            **urls,
            "proxy": proxy.url,
            "metrics": proxy.admin + "/metrics",
            "dashboard": proxy.admin + "/",
            "config": config,
        }

    async def _rollout(
        self, stack: contextlib.AsyncExitStack, proxy: ProxyProcess, stop: asyncio.Event
    ) -> int:
        users = await stack.enter_async_context(
            aiohttp.ClientSession(
                cookie_jar=aiohttp.DummyCookieJar(),  # each user keeps their own cookie
                connector=aiohttp.TCPConnector(limit=0),
                timeout=aiohttp.ClientTimeout(total=10),
            )
        )
        admin = await stack.enter_async_context(aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)))
        for service in self.services:
            service.traffic = Traffic(proxy.url, users, host=service.model.host)
            service.traffic.start()
            stack.push_async_callback(service.traffic.close)  # runs before the proxy stops (LIFO)
        watcher = asyncio.create_task(self.watch(admin, proxy.admin))
        stack.push_async_callback(_cancel, watcher)
        settings = controller_settings(self.options, self.plan)
        with _capture_controller_logs(self):
            rollouts = [
                asyncio.create_task(self._rollout_of(i, proxy, admin, settings, stop))
                for i in range(len(self.services))
            ]
            try:
                codes = await asyncio.gather(*rollouts)
            finally:  # one that failed takes the others down with it, never leaves them behind
                for task in rollouts:
                    task.cancel()
                await asyncio.gather(*rollouts, return_exceptions=True)
        # Several: 0 only when every one promoted, 1 (rolled back) as soon as one did.
        return STOPPED if STOPPED in codes else max(codes)

    async def _rollout_of(
        self,
        index: int,
        proxy: ProxyProcess,
        session: aiohttp.ClientSession,
        settings: Settings,
        stop: asyncio.Event,
    ) -> int:
        """One service's rollout, as ``rollout --config FILE --metrics-url ...`` runs it, on the
        series of its own route (``default`` for the only one)."""
        SERVICE.set(index)  # this task's: its controller's records name the service
        service = self.services[index]
        source = ScrapeSource([proxy.admin + "/metrics"], session, route=service.route)
        code = await Controller(FileStore(service.config_path), source, settings).run(restart=True, stop=stop)
        service.model.result = None if code == STOPPED else code
        return code


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


@contextlib.asynccontextmanager
async def _signals() -> AsyncIterator[tuple[asyncio.Event, list[int]]]:
    """SIGINT (Ctrl-C) and SIGTERM set the event; the list holds the signal's number."""
    stop, caught = asyncio.Event(), [0]
    loop = asyncio.get_running_loop()

    def on_signal(number: int) -> None:
        caught[0] = number
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        yield stop, caught
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def run_demo(options: DemoOptions) -> int:
    """The exit code: 0 promoted, 1 rolled back, 2 could not start, 128 + N on signal N."""
    live = default_live() if options.live is None else options.live
    view = make_view(live=live)
    demo = Demo(options, view)
    async with _signals() as (stop, caught):
        try:
            code = await demo.run(stop)
        except StartError as exc:
            print_errors([str(exc)])
            return Exit.USAGE
        if code == STOPPED or caught[0]:
            view.close(demo.model, None)
            return signalled(caught[0] or signal.SIGINT)
        view.close(demo.model, code)
        return code


def default_live() -> bool:
    """A live view only where someone watches: a terminal that can redraw in place."""
    return sys.stdout.isatty() and os.environ.get("TERM") != "dumb"
