"""Config control: one ``load`` for ``check``, ``serve``'s start and every reload, over routes.

``ConfigControl`` validates what a source offers and swaps in the good part as one
``Routes`` value. A source of one route (a file with one document, ``--configmap``) works
as it always has: an invalid update never replaces the last good config (it is logged with
the reason and counted once per distinct content). In a source of several routes each route
stands alone: a bad one is reported, counted and keeps its last good version (or is not
served, if it never had one); the others are unaffected.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import PurePath
from typing import Any

from .config import Config, ConfigError
from .metrics import Metrics
from .routes import Origin, Rejected, Route, RouteTable, parse_route, settle_names
from .sources.raw import RawConfig, RawRoute
from .tls import validate_upstream_ca

log = logging.getLogger(__name__)


def load_route(
    data: Mapping[str, Any] | None, error: ConfigError | None, *, name: str, order: tuple[Any, ...]
) -> Route:
    """One route, fully validated; ConfigError lists every problem."""
    if error is not None:
        raise error
    assert data is not None
    route = parse_route(data, name=name, order=order)
    validate_upstream_ca(route.config.upstream_ca)  # the one key that names a file
    return route


def load(raw: RawConfig, *, origin: str = "config") -> Routes:
    """Every route in ``raw``, fully validated; ConfigError lists every problem of every route
    (``check`` and ``serve``'s start, where nothing good came before to keep)."""
    routes = load_each(raw, origin=origin)
    if routes.rejected:
        raise ConfigError([f"{r.name}: {line}" for r in routes.rejected for line in r.errors])
    return routes


def load_each(raw: RawConfig, *, origin: str = "config") -> Routes:
    """Every route in ``raw`` that is valid, and the others as ``rejected`` (``routes``: one
    bad ConfigMap must not hide the rest of a cluster's routes). ConfigError if the source
    itself could not be read, or if its one route is invalid."""
    if raw.routes is None:
        route = load_route(raw.data, raw.error, name=route_name(origin), order=())
        return Routes.of([route], [raw.data or {}])
    routes, datas, rejected = [], [], []
    for item in raw.routes:
        try:
            route = load_route(item.data, item.error, name=item.name, order=item.order)
            routes.append(replace(route, origin=item.origin) if item.origin else route)
            datas.append(item.data or {})
        except ConfigError as exc:
            rejected.append(Rejected(item.name, exc.errors))
    return Routes.of(routes, datas, rejected)


def route_name(origin: str) -> str:
    """A one-route source's route is named after it: the file's name, or NAMESPACE/NAME."""
    if origin.startswith("configmap "):
        return origin.removeprefix("configmap ")
    return PurePath(origin).name or origin


@dataclass(frozen=True, slots=True)
class Routes:
    """What the data plane serves, swapped whole: the routes (conflicting ones included: the
    table decides), their raw documents (for workers), and those not served."""

    routes: tuple[Route, ...]
    raw: tuple[Mapping[str, Any], ...]  # each route's document, in ``routes`` order
    rejected: tuple[Rejected, ...] = ()
    table: RouteTable[None] = field(compare=False, default_factory=lambda: RouteTable(()))

    @classmethod
    def of(
        cls, routes: Sequence[Route], raw: Sequence[Mapping[str, Any]], rejected: Sequence[Rejected] = ()
    ) -> Routes:
        named = settle_names(routes)
        return cls(tuple(named), tuple(raw), tuple(rejected), RouteTable((r, None) for r in named))

    @property
    def single(self) -> Config | None:
        """The config of a lone route: a single-pair proxy, whose /config is that config."""
        return self.routes[0].config if len(self.routes) == 1 else None

    @property
    def lone_default(self) -> bool:
        """One catch-all route, named ``default``: everything looks as it did before routes."""
        return len(self.routes) == 1 and self.routes[0].catch_all and self.routes[0].name == "default"

    def messages(self) -> list[str]:
        return [c.message() for c in self.table.conflicts]

    def to_wire(self) -> list[dict[str, Any]]:
        """For the workers: enough to rebuild each route exactly (names are final)."""
        return [
            {"name": r.name, "order": list(r.order), "data": dict(d)}
            | ({"origin": r.origin.to_wire()} if r.origin else {})
            for r, d in zip(self.routes, self.raw, strict=True)
        ]

    @classmethod
    def from_wire(cls, items: Sequence[Mapping[str, Any]]) -> Routes:
        routes = [parse_route(i["data"], name=i["name"], order=tuple(i["order"])) for i in items]
        named = [
            replace(r, name=i["name"], origin=Origin.from_wire(i.get("origin")))
            for r, i in zip(routes, items, strict=True)
        ]
        return cls(tuple(named), tuple(i["data"] for i in items), (), RouteTable((r, None) for r in named))

    def document(self) -> dict[str, Any]:
        """/config: a lone default route is its flat effective config, as before routes; else
        every route (where it applies, and its effective config), the conflicts and the
        routes not served."""
        if self.lone_default:
            return self.routes[0].config.effective()
        winners = {r.name for r in self.table.routes}
        return {
            "routes": [
                {**r.describe(), "served": r.name in winners, **_ingress(r), **r.config.effective()}
                for r in self.routes
            ],
            "conflicts": self.messages(),
            "rejected": [{"name": r.name, "errors": r.errors} for r in self.rejected],
        }


def _ingress(route: Route) -> dict[str, Any]:
    """Where an Ingress-mode route came from, for /config."""
    return {"ingress": route.origin.to_wire()} if route.origin else {}


@dataclass(frozen=True, slots=True)
class RolloutNotes:
    """A rollout state that came with the config: a ConfigMap's ``canary-proxy.io/*`` annotations."""

    store: str  # where it is kept, as ``status`` names it: "configmap shop/canary-proxy"
    annotations: Mapping[str, str]


OnChange = Callable[[Routes], None]


class ConfigControl:
    """Validates each version the source offers; swaps in the good part, counts bad parts once.

    An offer with the digest of the one before -- a ConfigMap whose rollout annotations alone
    changed -- only updates ``rollout_notes``: it is no reload, and is neither logged nor
    counted.
    """

    def __init__(self, metrics: Metrics, on_change: list[OnChange]) -> None:
        self.metrics = metrics
        self.on_change = on_change
        self.routes: Routes | None = None
        self.rollout_notes: RolloutNotes | None = None  # ConfigMap mode: for the dashboard
        self.source_notes: Mapping[str, Any] | None = None  # what the source reports, for /config
        self._last: tuple[str, bool] | None = None  # the last offer's digest, and if it was taken
        self._good: dict[str, tuple[str, Route, Mapping[str, Any]]] = {}  # per route: digest, route, doc
        self._bad: dict[str, str] = {}  # per route: the digest last rejected (counted once)
        self._ratios: dict[str, float] = {}  # per route: the weight ratio its gauge was set to

    @property
    def current(self) -> Config | None:
        """The config of a lone route (the single-pair proxy), else None."""
        return self.routes.single if self.routes is not None else None

    @property
    def current_raw(self) -> dict[str, Any] | None:
        routes = self.routes
        return dict(routes.raw[0]) if routes is not None and len(routes.routes) == 1 else None

    def offer(self, raw: RawConfig, *, origin: str) -> bool:
        if raw.annotations is not None:
            # A ConfigMap source's origin is "configmap NS/NAME", as its rollout store names it.
            self.rollout_notes = RolloutNotes(origin, raw.annotations)
        self.source_notes = raw.notes
        if self._last is not None and self._last[0] == raw.digest:
            return self._last[1]
        accepted = (
            self._take(raw, origin=origin) if raw.routes is None else self._take_each(raw.routes, origin)
        )
        self._last = (raw.digest, accepted)
        return accepted

    def _take(self, raw: RawConfig, *, origin: str) -> bool:
        try:
            route = load_route(raw.data, raw.error, name=route_name(origin), order=())
        except ConfigError as exc:
            self._rejected(f"rejected new config from {origin}, keeping the last good one", exc)
            return False
        assert raw.data is not None
        self._swap(Routes.of([route], [raw.data]))
        config = route.config
        effective = config.effective()
        log.info(
            "config loaded from %s: canary-weight %s/%s",
            origin,
            effective["canary-weight"],
            config.canary_weight_total,
            extra={"effective": effective},
        )
        return True

    def _take_each(self, items: Sequence[RawRoute], origin: str) -> bool:
        """Each route on its own: a bad one keeps its last good version; none affects another."""
        good: dict[str, tuple[str, Route, Mapping[str, Any]]] = {}
        rejected: list[Rejected] = []
        for item in items:
            kept = self._good.get(item.name)
            if kept is not None and kept[0] == item.digest:
                good[item.name] = kept
                continue
            try:
                route = load_route(item.data, item.error, name=item.name, order=item.order)
                route = replace(route, origin=item.origin) if item.origin else route
            except ConfigError as exc:
                rejected.append(Rejected(item.name, exc.errors))
                if self._bad.get(item.name) != item.digest:
                    self._bad[item.name] = item.digest
                    keeping = "keeping its last good version" if kept is not None else "not served"
                    self._rejected(f"rejected route {item.name} from {origin}, {keeping}", exc)
                if kept is not None:
                    good[item.name] = kept
                continue
            self._bad.pop(item.name, None)
            good[item.name] = (item.digest, route, item.data or {})
        changed = [name for name in good if self._good.get(name) != good[name]]
        gone = [name for name in self._good if name not in good]
        self._good = good
        if self.routes is not None and not changed and not gone:
            if tuple(rejected) != self.routes.rejected:  # news for /config, not for the data plane
                self.routes = replace(self.routes, rejected=tuple(rejected))
            return not rejected
        ordered = sorted(good.values(), key=lambda g: (g[1].order, g[1].name))
        routes = Routes.of([g[1] for g in ordered], [g[2] for g in ordered], rejected)
        self._swap(routes)
        for message in routes.messages():
            log.warning("%s", message)
        log.info(
            "config loaded from %s: %d routes",
            origin,
            len(routes.routes),
            extra={"changed": changed, "removed": gone, "routes": [r.name for r in routes.routes]},
        )
        return not rejected

    def _rejected(self, what: str, exc: ConfigError) -> None:
        self.metrics.config_reloads.labels("failure").inc()
        log.error("%s: %s", what, "; ".join(exc.errors), extra={"errors": exc.errors})

    def _swap(self, routes: Routes) -> None:
        changed = self.routes is None or routes != self.routes
        self.routes = routes
        self.metrics.config_reloads.labels("success").inc()
        self.metrics.config_last_success.set(time.time())
        for route in routes.routes:
            ratio = route.config.weight_ratio
            if self._ratios.get(route.name) != ratio:  # labels() per route: 2 ms for 1,000
                self._ratios[route.name] = ratio
                self.metrics.weight_ratio.labels(route.name).set(ratio)
        if changed:
            for callback in self.on_change:
                callback(routes)

    async def follow(self, updates: AsyncIterator[RawConfig], *, origin: str) -> None:
        async for raw in updates:
            self.offer(raw, origin=origin)
