"""The admin port's aiohttp app: /healthz, /readyz, /config, /metrics, / (dashboard), /stats."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry

from ..address import Address, ListenError, bound_address
from ..control import ConfigControl, Routes
from ..metrics import exposition
from ..router import DEFAULT_ROUTE
from ..routes import Route
from .stats import Sampler, offered_routes, stats_document

log = logging.getLogger(__name__)


@dataclass(slots=True)
class AdminState:
    control: ConfigControl
    registry: CollectorRegistry
    ready: Callable[[], bool]
    config_path: str | None = None  # file mode: the dashboard shows the rollout beside it
    # (in ConfigMap mode the rollout comes with the config: ``control.rollout_notes``)
    # The routes the data plane serves: with workers, the oldest any of them applied.
    serving: Callable[[], Routes | None] | None = None

    def routes(self) -> Routes | None:
        """What is served; with the routes the control plane rejected last (not sent on)."""
        served = self.control.routes if self.serving is None else self.serving()
        latest = self.control.routes
        if served is None or latest is None or served.rejected == latest.rejected:
            return served
        return replace(served, rejected=latest.rejected)

    def served(self) -> list[Route]:
        """The routes the data plane serves (the winners of any conflict), in the config's order."""
        routes = self.routes()
        return list(routes.table.routes) if routes is not None else []


ADMIN_STATE = web.AppKey("admin_state", AdminState)
STATS = web.AppKey("stats", Sampler)
DASHBOARD_DIR = Path(__file__).with_name("dashboard")  # package data: the page, its script, uPlot


def admin_app(state: AdminState) -> web.Application:
    app = web.Application()
    app[ADMIN_STATE] = state
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/config", _config)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/stats", _stats)
    app.router.add_get("/", _dashboard)
    app.router.add_static("/dashboard/", DASHBOARD_DIR)
    app[STATS] = Sampler(state.registry, config_path=state.config_path)
    app.cleanup_ctx.append(_sampling)
    return app


async def _sampling(app: web.Application) -> AsyncIterator[None]:
    """Snapshot the collectors once a second for /stats while the admin port is up."""
    control = app[ADMIN_STATE].control

    def routes() -> int:
        return len(control.routes.routes) if control.routes is not None else 0

    task = asyncio.create_task(
        app[STATS].run(lambda: control.current_raw, lambda: control.rollout_notes, routes)
    )
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def _dashboard(request: web.Request) -> web.FileResponse:
    return web.FileResponse(DASHBOARD_DIR / "index.html", headers={"Cache-Control": "no-cache"})


async def _stats(request: web.Request) -> web.Response:
    """One route's chart data from the sampler's history (the same collectors as /metrics):
    ``?route=NAME``, else the lone route or the first. The rollout is shown for a lone route
    only: it is the one a ``--config FILE`` or ConfigMap rollout records."""
    sampler, served = request.app[STATS], request.app[ADMIN_STATE].served()
    sampler.watched()
    routes = offered_routes(sampler.history.latest, [r.name for r in served])
    route = request.query.get("route") or (routes[0] if routes else DEFAULT_ROUTE)
    if "route" in request.query and route not in routes:
        error = {"error": f"no route {route!r}", "routes": routes}
        return web.json_response(error, status=404, headers={"Cache-Control": "no-store"})
    config = next((r.config for r in served if r.name == route), None)
    document = stats_document(
        sampler.history,
        route=route,
        routes=routes,
        effective=None if config is None else config.effective(),
        rollout=sampler.rollout if len(served) <= 1 else None,
        interval=sampler.interval,
    )
    return web.json_response(document, headers={"Cache-Control": "no-store"})


async def _healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def _readyz(request: web.Request) -> web.Response:
    if request.app[ADMIN_STATE].ready():
        return web.Response(text="ready\n")
    return web.Response(status=503, text="not ready\n")


async def _config(request: web.Request) -> web.Response:
    state = request.app[ADMIN_STATE]
    routes = state.routes()
    if routes is None:
        return web.json_response({"error": "no config loaded yet"}, status=503)
    notes = state.control.source_notes
    return web.json_response(routes.document() | (dict(notes) if notes else {}))


async def _metrics(request: web.Request) -> web.Response:
    registry = request.app[ADMIN_STATE].registry
    body = await asyncio.to_thread(exposition, registry)  # generate_latest, plus nginx's derived families
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def start_admin(state: AdminState, address: Address) -> tuple[web.AppRunner, Address]:
    """The admin port, started; ListenError if its address cannot be bound."""
    runner = web.AppRunner(admin_app(state), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, address.host, address.port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ListenError("--admin-listen", address, exc) from None
    bound = bound_address(site._server)
    log.info("admin port listening on %s", bound, extra={"admin": str(bound)})
    return runner, bound
