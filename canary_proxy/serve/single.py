"""``--workers 1``: the control plane and the data plane in this one process."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable

from prometheus_client import CollectorRegistry

from ..admin.app import AdminState, start_admin
from ..control import ConfigControl
from ..metrics import Metrics
from ..proxy.server import ProxyServer
from ..runner import Exit
from ..sources.raw import RawConfig
from .lifecycle import Lifecycle
from .public import access_log_for, drain, public_tls, serve_public, watch_tls
from .settings import Settings

log = logging.getLogger(__name__)


async def run_single(
    settings: Settings,
    *,
    initial: RawConfig | None,
    updates: Callable[[], AsyncIterator[RawConfig]],
    origin: str,
) -> int:
    """Serve until SIGTERM or SIGINT, then drain. ``initial`` (validated by the caller) is
    None when the source has nothing yet (a ConfigMap behind an API that is down): the ports
    open at once, /readyz says 503 and requests get 503 until it loads.

    Raises ListenError (a port) or TlsError (the certificate pair) before serving.
    """
    registry = CollectorRegistry()
    metrics = Metrics(registry, nginx=settings.nginx_metrics)
    metrics.init_data_plane(route=None)  # each route's series come with it: ProxyServer.apply_routes
    metrics.init_control_plane()
    proxy = ProxyServer(metrics=metrics, access_log=access_log_for(settings), limits=settings.limits)
    fallback = settings.default_backend_config()
    control = ConfigControl(metrics, [lambda routes: proxy.apply_routes(routes.routes, fallback=fallback)])
    if initial is not None:
        control.offer(initial, origin=origin)
    tls = public_tls(settings)
    async with Lifecycle() as life:
        public = await serve_public(proxy, settings.listen, tls=tls)
        state = AdminState(
            control,
            registry,
            lambda: not life.stop.is_set() and control.routes is not None,
            config_path=settings.config_path,
        )
        admin, admin_address = await start_admin(state, settings.admin_listen)
        try:
            ports = {"public": str(public.address), "admin": str(admin_address)}
            if control.routes is not None:
                log.info("ready", extra=ports)
            else:
                log.warning("waiting for a valid config from %s; /readyz is 503 until then", origin)
                control.on_change.append(_once(lambda: log.info("ready", extra=ports)))
            life.start(control.follow(updates(), origin=origin))
            watch_tls(life, settings, tls)
            await life.stop.wait()
            log.info("%s: /readyz is now 503", life.signal_name)
            await drain(public, proxy, settings, life)
        finally:
            await admin.cleanup()
    return Exit.INTERRUPTED if life.hurry.is_set() else Exit.OK


def _once(action: Callable[[], None]) -> Callable[..., None]:
    done = False

    def callback(*_: object) -> None:
        nonlocal done
        if not done:
            done = True
            action()

    return callback
