"""Ingress objects -> routes, as ingress-nginx reads them. Pure, no I/O.

``routes_from_ingresses`` takes the API's JSON of ``networking.k8s.io/v1`` Ingresses and
``v1`` Services and returns the routes to serve, with everything it could not serve or
carry reported as data: one bad Ingress never hides the others.

The rules, in the order they apply:

1. **Claimed**: an Ingress whose ``spec.ingressClassName`` or legacy
   ``kubernetes.io/ingress.class`` annotation is the class; all others are not looked at.
2. **Main Ingresses first**, oldest first: by ``creationTimestamp``, and at the same second
   by ``NAMESPACE/NAME`` in *descending* order, exactly as ingress-nginx's
   ``sortIngressSlice`` does (``in > jn``). Every rule's host and path becomes a route
   (``Prefix``; ``Exact``; ``ImplementationSpecific`` as ``Prefix``), and
   ``spec.defaultBackend`` the catch-all (any host, prefix ``/``). A later route with the
   same host, path and type is reported as a conflict and not served.
3. **Backends** are reached at the Service's ``spec.clusterIP`` and the Service port the
   Ingress names (its number, or its name through the Service's ``ports``), so kube-proxy
   balances and nothing is looked up per connection; a headless Service (``clusterIP:
   None``) by ``SERVICE.NAMESPACE.svc.cluster.local:PORT``; an ``ExternalName`` Service
   by its external name.
4. **Canary Ingresses** (``<prefix>/canary: "true"``, oldest first) attach their backend
   as the canary of the route with the same host, path and type *in their namespace*
   (Argo Rollouts and Flagger always create the canary beside the main Ingress; across
   namespaces it would let one tenant take another's traffic). At most one canary per
   route, as in ingress-nginx: a second is reported, not merged. A canary path with no
   such route is reported and ignored. A canary path whose backend is the route's own
   stable backend is no canary at all (Argo copies whole rules, other services' paths
   included) and is passed over.
5. **Annotations** under the prefix: the canary ones are carried on a canary Ingress;
   ``proxy-read-timeout`` and ``proxy-connect-timeout`` become ``upstream-timeout`` and
   ``upstream-connect-timeout`` and ``proxy-body-size`` the route's ``body_limit``, from
   the main Ingress (ingress-nginx ignores them on a canary, which inherits the main's:
   a canary's differing value is listed as ignored). Every other one is listed once per
   Ingress under ``ignored`` with the reason; ``configuration-snippet`` and
   ``server-snippet`` are never executed. These rules and the reasons are in
   ``ingress_annotations``.

Route names are ``NAMESPACE/INGRESS`` for an Ingress with one route and
``NAMESPACE/INGRESS#N`` for its Nth of several (paths in order, then the default
backend), the convention a file's YAML documents already follow: the ``route`` metric
label stays short and readable, and the nginx-compatible metrics get the Ingress name
from ``IngressRoute.ingress`` anyway.

Each route's config is built as a flat mapping and validated by ``routes.parse_route``.
A route with no canary Ingress gets its own stable backend as ``canary-url`` and weight
0: the config needs both URLs, and no rule can reach the canary side.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Final, Protocol

from .config import ConfigError
from .ingress_annotations import DEFAULT_PREFIX, INHERITED, NginxAnnotations, Reading
from .routes import EXACT, PREFIX, Route, parse_route

DEFAULT_CLASS: Final = "canary-proxy"
LEGACY_CLASS_ANNOTATION: Final = "kubernetes.io/ingress.class"


@dataclass(frozen=True, slots=True)
class Report:
    """Something that is not served as written: what, where, and why."""

    kind: str  # conflict, second-canary, orphan-canary, backend, invalid
    ingress: str  # NAMESPACE/NAME
    message: str


@dataclass(frozen=True, slots=True)
class Ignored:
    """An annotation that has no effect, listed once per Ingress with the reason."""

    ingress: str
    annotation: str
    reason: str


@dataclass(frozen=True, slots=True)
class Backend:
    """A Service port as an Ingress names it, and where it is reached."""

    namespace: str
    service: str
    port: int | str  # as the Ingress names it: a number, or the Service port's name
    url: str  # http://CLUSTER_IP:PORT, or the DNS name of a headless Service

    @property
    def upstream(self) -> str:
        """ingress-nginx's upstream name, ``NAMESPACE-SERVICE-PORT`` (the port as named)."""
        return f"{self.namespace}-{self.service}-{self.port}"


@dataclass(frozen=True, slots=True)
class IngressRoute:
    """A route and what the nginx-compatible metrics label it with."""

    route: Route
    namespace: str
    ingress: str  # the main Ingress's name (the ``ingress`` label)
    host: str  # as the Ingress writes it ("" for any host)
    path: str  # as the Ingress writes it (the ``path`` label)
    stable: Backend
    canary: Backend | None = None
    canary_ingress: str | None = None
    body_limit: int | None = None  # proxy-body-size in bytes; 0 = unlimited; None = not set
    data: Mapping[str, str] = field(default_factory=dict, compare=False)  # what parse_route validated

    @property
    def service(self) -> str:
        """The stable Service's name (the ``service`` label, for canary requests too)."""
        return self.stable.service

    @property
    def canary_service(self) -> str | None:
        return self.canary.service if self.canary else None

    @property
    def canary_label(self) -> str:
        """The ``canary`` label of a request the canary served: its upstream's name, as
        ingress-nginx fills it from ``proxy_alternative_upstream_name``; stable's is ``""``."""
        return self.canary.upstream if self.canary else ""


@dataclass(frozen=True, slots=True)
class IngressRoutes:
    routes: tuple[IngressRoute, ...] = ()
    reported: tuple[Report, ...] = ()
    ignored: tuple[Ignored, ...] = ()


class Parse(Protocol):
    def __call__(self, raw: Mapping[str, Any], *, name: str, order: tuple[Any, ...] = ()) -> Route: ...


class RouteMemo:
    """``parse_route``, remembered between translations: when one Ingress of many changes,
    only its routes are parsed again (parsing is most of a rebuild's cost). Each ``sweep``
    forgets what the translation before it did not use, so the memo never outgrows the
    routes."""

    def __init__(self) -> None:
        self._kept: dict[tuple[Any, ...], Route | list[str]] = {}
        self._used: dict[tuple[Any, ...], Route | list[str]] = {}

    def __call__(self, raw: Mapping[str, Any], *, name: str, order: tuple[Any, ...] = ()) -> Route:
        key = (tuple(sorted(raw.items())), name, order)
        found = self._used.get(key) or self._kept.get(key)
        if found is None:
            try:
                found = parse_route(raw, name=name, order=order)
            except ConfigError as exc:
                found = list(exc.errors)
        self._used[key] = found
        if isinstance(found, list):
            raise ConfigError(list(found))
        return found

    def sweep(self) -> None:
        self._kept, self._used = self._used, {}


def routes_from_ingresses(
    ingresses: Iterable[Mapping[str, Any]],
    services: Iterable[Mapping[str, Any]],
    *,
    ingress_class: str = DEFAULT_CLASS,
    annotation_prefix: str = DEFAULT_PREFIX,
    parse: Parse = parse_route,
) -> IngressRoutes:
    """The routes the claimed Ingresses describe (see the module docstring for the rules).
    ``parse`` validates each route's config: ``parse_route``, or a ``RouteMemo`` of it."""
    rules = NginxAnnotations.under(annotation_prefix)
    by_service = {_key(s): s for s in services if isinstance(s, Mapping)}
    claimed = _oldest_first(i for i in ingresses if isinstance(i, Mapping) and claims(i, ingress_class))
    state = _State(rules, by_service, parse)
    mains = [i for i in claimed if not rules.is_canary(_annotations(i))]
    canaries = [i for i in claimed if rules.is_canary(_annotations(i))]
    for rank, ingress in enumerate(mains):
        state.guarded(ingress, partial(state.add_main, ingress, rank))
    for ingress in canaries:
        state.guarded(ingress, partial(state.add_canary, ingress))
    return state.result()


@dataclass
class _Draft:
    """A main route before its config is validated."""

    name: str
    order: tuple[Any, ...]
    namespace: str
    ingress: str
    host: str
    path: str
    path_type: str
    stable: Backend
    main_raw: dict[str, str]  # host/path keys and the main Ingress's carried annotations
    body_limit: int | None
    canary: Backend | None = None
    canary_ingress: str | None = None
    canary_raw: dict[str, str] = field(default_factory=dict)


@dataclass
class _State:
    rules: NginxAnnotations
    services: dict[tuple[str, str], Mapping[str, Any]]
    parse: Parse
    drafts: dict[tuple[str, str, str], _Draft] = field(default_factory=dict)
    reported: list[Report] = field(default_factory=list)
    ignored: dict[tuple[str, str], Ignored] = field(default_factory=dict)

    def guarded(self, ingress: Mapping[str, Any], add: Callable[[], None]) -> None:
        """One malformed Ingress (a list where the API has a mapping) is reported, not raised."""
        try:
            add()
        except (AttributeError, TypeError, ValueError) as exc:
            namespace, name = _key(ingress)
            self.report("invalid", f"{namespace}/{name}", f"malformed Ingress: {exc}")

    def report(self, kind: str, ingress: str, message: str) -> None:
        self.reported.append(Report(kind, ingress, message))

    def ignore(self, ingress: str, annotation: str, reason: str) -> None:
        self.ignored.setdefault((ingress, annotation), Ignored(ingress, annotation, reason))

    def read(
        self, ingress: Mapping[str, Any], where: str, how: Callable[[Mapping[str, str]], Reading]
    ) -> Reading:
        """The Ingress's annotations read ``how`` (``rules.main`` or ``rules.canary``); the
        ones not applied are reported, the ones with no effect listed as ignored."""
        reading = how(self.rules.of(_annotations(ingress)))
        for message in reading.invalid:
            self.report("invalid", where, message)
        for annotation, reason in reading.ignored:
            self.ignore(where, annotation, reason)
        return reading

    # -- main Ingresses --------------------------------------------------------------------

    def add_main(self, ingress: Mapping[str, Any], rank: int) -> None:
        """``rank``: the Ingress's place, oldest first; its routes' ``order`` in a RouteTable."""
        namespace, name = _key(ingress)
        where = f"{namespace}/{name}"
        annotations = self.read(ingress, where, self.rules.main)
        paths = _paths(ingress)
        if not paths:
            self.report("invalid", where, "no rules with paths and no defaultBackend: nothing to serve")
        for number, (host, path, path_type, backend) in enumerate(paths, 1):
            route_name = where if len(paths) == 1 else f"{where}#{number}"
            stable = self._backend(namespace, backend, where, f"{host or '*'} {path}")
            if stable is None:
                continue
            raw = {"host": host, "path": path, "path-type": path_type, **annotations.carried}
            key = self._route_key(raw, where, route_name)
            if key is None:
                continue
            winner = self.drafts.get(key)
            if winner is not None:
                self.report(
                    "conflict",
                    where,
                    f"route {route_name} conflicts with {winner.name} on host {host or '*'} path {path} "
                    f"({path_type}); {winner.name} is older and wins",
                )
                continue
            self.drafts[key] = _Draft(
                route_name, (rank, number), namespace, name, host, path, path_type,
                stable, raw, annotations.body_limit,
            )  # fmt: skip

    def _route_key(self, raw: dict[str, str], where: str, name: str) -> tuple[str, str, str] | None:
        """The normalised host, path and type: the key canaries and conflicts match on."""
        try:
            return self.parse({**raw, **_PLACEHOLDER}, name=name).key
        except ConfigError as exc:
            self.report("invalid", where, f"route {name}: {'; '.join(exc.errors)}")
            return None

    # -- canary Ingresses ------------------------------------------------------------------

    def add_canary(self, ingress: Mapping[str, Any]) -> None:
        namespace, name = _key(ingress)
        where = f"{namespace}/{name}"
        canary_rules = self.read(ingress, where, self.rules.canary).carried
        for host, path, path_type, backend in _paths(ingress):
            shown = f"host {host or '*'} path {path} ({path_type})"
            key = self._match_key(host, path, path_type)
            draft = self.drafts.get(key) if key else None
            if draft is None or draft.namespace != namespace:
                self.report(
                    "orphan-canary", where,
                    f"canary for {shown}: no main Ingress in namespace {namespace} serves it; ignored",
                )  # fmt: skip
                continue
            canary = self._backend(namespace, backend, where, f"{host or '*'} {path}")
            if canary is None:
                continue
            if (canary.service, canary.url) == (draft.stable.service, draft.stable.url):
                continue  # the route's own backend: Argo copies whole rules
            if draft.canary_ingress is not None and draft.canary_ingress != name:
                self.report(
                    "second-canary", where,
                    f"canary for {shown}: route {draft.name} already has the canary "
                    f"{namespace}/{draft.canary_ingress} (at most one per route); ignored",
                )  # fmt: skip
                continue
            draft.canary, draft.canary_ingress, draft.canary_raw = canary, name, dict(canary_rules)
            self._compare_inherited(ingress, where, draft)

    def _compare_inherited(self, ingress: Mapping[str, Any], where: str, draft: _Draft) -> None:
        """A canary's differing timeout or body size is listed as ignored, never applied to
        the stable traffic too."""
        annotations = self.rules.of(_annotations(ingress))
        for annotation in self.rules.differing_inherited(
            annotations, main=draft.main_raw, body_limit=draft.body_limit
        ):
            self.ignore(where, annotation, INHERITED)

    def _match_key(self, host: str, path: str, path_type: str) -> tuple[str, str, str] | None:
        try:
            raw = {"host": host, "path": path, "path-type": path_type, **_PLACEHOLDER}
            return self.parse(raw, name="canary").key
        except ConfigError:
            return None

    # -- backends --------------------------------------------------------------------------

    def _backend(self, namespace: str, backend: Mapping[str, Any], where: str, what: str) -> Backend | None:
        service_ref = backend.get("service")
        if not isinstance(service_ref, Mapping) or not service_ref.get("name"):
            self.report(
                "backend",
                where,
                f"{what}: the backend is not a Service (resource backends are not supported)",
            )
            return None
        name = str(service_ref["name"])
        port_ref = service_ref.get("port") or {}
        named: int | str = port_ref.get("number") or str(port_ref.get("name") or "")
        service = self.services.get((namespace, name))
        if service is None:
            self.report("backend", where, f"{what}: Service {namespace}/{name} not found")
            return None
        spec = service.get("spec") or {}
        port = _service_port(spec, named)
        if port is None:
            self.report("backend", where, f"{what}: Service {namespace}/{name} has no port {named!r}")
            return None
        return Backend(namespace, name, named, f"http://{_address(spec, namespace, name)}:{port}")

    # -- result ----------------------------------------------------------------------------

    def result(self) -> IngressRoutes:
        routes = []
        for draft in sorted(self.drafts.values(), key=lambda d: d.order):
            built = self._build(draft)
            if built is not None:
                routes.append(built)
        return IngressRoutes(tuple(routes), tuple(self.reported), tuple(self.ignored.values()))

    def _build(self, draft: _Draft) -> IngressRoute | None:
        stable_only = {**draft.main_raw, "stable-url": draft.stable.url, "canary-url": draft.stable.url}
        if draft.canary is not None:
            data = {**stable_only, **draft.canary_raw, "canary-url": draft.canary.url}
            try:
                route = self.parse(data, name=draft.name, order=draft.order)
            except ConfigError as exc:
                where = f"{draft.namespace}/{draft.canary_ingress}"
                errors = "; ".join(exc.errors)
                self.report(
                    "invalid", where, f"canary for route {draft.name}: {errors}; stable serves it all"
                )
            else:
                return self._route(draft, route, data, canary=True)
        try:
            route = self.parse(stable_only, name=draft.name, order=draft.order)
        except ConfigError as exc:  # e.g. an ExternalName that is no host name
            where = f"{draft.namespace}/{draft.ingress}"
            self.report("invalid", where, f"route {draft.name}: {'; '.join(exc.errors)}")
            return None
        return self._route(draft, route, stable_only, canary=False)

    @staticmethod
    def _route(draft: _Draft, route: Route, data: dict[str, str], *, canary: bool) -> IngressRoute:
        return IngressRoute(
            route=route,
            namespace=draft.namespace,
            ingress=draft.ingress,
            host=draft.host,
            path=draft.path,
            stable=draft.stable,
            canary=draft.canary if canary else None,
            canary_ingress=draft.canary_ingress if canary else None,
            body_limit=draft.body_limit,
            data=data,
        )


_PLACEHOLDER: Final = {"stable-url": "http://placeholder", "canary-url": "http://placeholder"}


def _metadata(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def _annotations(obj: Mapping[str, Any]) -> Mapping[Any, Any]:
    annotations = _metadata(obj).get("annotations")
    return annotations or {}


def _key(obj: Mapping[str, Any]) -> tuple[str, str]:
    meta = _metadata(obj)
    return str(meta.get("namespace") or "default"), str(meta.get("name") or "")


def _oldest_first(ingresses: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """By creationTimestamp (RFC 3339 in UTC, so it sorts as text), then NAMESPACE/NAME
    descending, as ingress-nginx's sortIngressSlice orders Ingresses of the same second."""
    by_name = sorted(ingresses, key=lambda i: "/".join(_key(i)), reverse=True)
    return sorted(by_name, key=lambda i: str(_metadata(i).get("creationTimestamp") or ""))


def claims(ingress: Mapping[str, Any], ingress_class: str) -> bool:
    """Whether the Ingress is of this class: by `spec.ingressClassName`, or by the legacy
    `kubernetes.io/ingress.class` annotation."""
    spec = ingress.get("spec") or {}
    legacy = _annotations(ingress).get(LEGACY_CLASS_ANNOTATION)
    return spec.get("ingressClassName") == ingress_class or legacy == ingress_class


def _paths(ingress: Mapping[str, Any]) -> list[tuple[str, str, str, Mapping[str, Any]]]:
    """(host, path, path type, backend) of every rule path, then of the defaultBackend."""
    spec = ingress.get("spec") or {}
    found: list[tuple[str, str, str, Mapping[str, Any]]] = []
    for rule in spec.get("rules") or []:
        host = str(rule.get("host") or "")
        for path in (rule.get("http") or {}).get("paths") or []:
            path_type = EXACT if path.get("pathType") == "Exact" else PREFIX
            found.append((host, str(path.get("path") or "/"), path_type, path.get("backend") or {}))
    default = spec.get("defaultBackend")
    if isinstance(default, Mapping):
        found.append(("", "/", PREFIX, default))
    return found


def _service_port(spec: Mapping[str, Any], named: int | str) -> int | None:
    """The Service port an Ingress names, by number or by name."""
    ports = [p for p in spec.get("ports") or [] if isinstance(p, Mapping)]
    for port in ports:
        if named in (port.get("port"), port.get("name")) and isinstance(port.get("port"), int):
            return int(port["port"])
    if isinstance(named, int) and spec.get("type") == "ExternalName":
        return named  # an ExternalName Service need not list its ports
    return None


def _address(spec: Mapping[str, Any], namespace: str, name: str) -> str:
    if spec.get("type") == "ExternalName" and spec.get("externalName"):
        return str(spec["externalName"])
    ip = str(spec.get("clusterIP") or "")
    if not ip or ip == "None":
        return f"{name}.{namespace}.svc.cluster.local"
    return f"[{ip}]" if ":" in ip else ip
