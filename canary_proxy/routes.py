"""Routes: which stable/canary pair serves a request, by host and path. Pure, no I/O.

A route is today's flat config plus ``host``, ``path`` and ``path-type`` (and an optional
``name``). A config without them is one catch-all route: exactly the single-pair proxy.

Which route wins, as Ingress controllers decide (the candidates are every route whose host
and path match the request):

1. An exact host beats a wildcard (``*.example.com``: exactly one more label), which beats
   a route for any host (``host`` empty).
2. Then the longest path wins.
3. At the same path, ``exact`` beats ``prefix``.

A ``prefix`` path matches by whole segments, as Ingress ``Prefix``: ``/api`` matches
``/api`` and ``/api/x``, not ``/apix``; a trailing ``/`` is ignored. A request's Host is
matched without its port and without regard to case.

Two routes with the same host, path and path type conflict: the one created first wins
(its ``order``), the other is reported and not served.

Lookup cost: the table is precomputed at load into two dicts (exact and prefix routes) keyed
by host and path together. A request probes its host's key for its whole path, then for
each shorter prefix that ends at a ``/`` (only those as long as some prefix route's path),
then its root; then the wildcard's key the same way, then the any-host key. Each probe is
one dict lookup, and nothing grows with the total number of routes: with traffic spread
over 1,000 routes, a scan through each host's candidates touched three objects a candidate,
each cold in the cache (see docs/performance.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any, Final, Generic, TypeVar

from .config import Config, ConfigError, parse_config
from .router import DEFAULT_ROUTE, UNROUTED

PREFIX: Final = "prefix"
EXACT: Final = "exact"
ROUTE_KEYS: Final = ("name", "host", "path", "path-type")
RESERVED: Final = frozenset({UNROUTED, "default-backend"})  # route labels the proxy itself uses

_HOST_LABEL = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")

T = TypeVar("T")
V = TypeVar("V")


@dataclass(frozen=True, slots=True)
class Origin:
    """Where an Ingress-mode route came from: what ingress-nginx's metrics label its
    requests with, and what the Ingress asks of the data path beyond the config keys."""

    namespace: str
    ingress: str  # the main Ingress's name (the ``ingress`` label)
    service: str  # the stable Service's name (the ``service`` label)
    host: str  # the rule's host as written, "" for any (the ``host`` label)
    path: str  # the path as written (the ``path`` label)
    canary: str = ""  # the canary upstream's NAMESPACE-SERVICE-PORT; "" without a canary
    ssl_redirect: bool = False  # the host has TLS: a plain-HTTP request gets a 308 to https
    body_limit: int | None = None  # proxy-body-size: bytes, 0 unlimited; None: --max-body-size

    def to_wire(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}

    @classmethod
    def from_wire(cls, data: Mapping[str, Any] | None) -> Origin | None:
        return None if data is None else cls(**data)


@dataclass(frozen=True, slots=True)
class Route:
    """One route: where it applies, and the stable/canary config it serves."""

    name: str
    host: str  # "" (any host), "shop.example.com", or "*.example.com"
    path: str  # starts with "/"
    path_type: str  # PREFIX or EXACT
    config: Config
    order: tuple[Any, ...] = ()  # creation order: the earlier one wins a conflict
    named: bool = False  # by its own ``name`` key, not by where it came from
    origin: Origin | None = None  # the Ingress it was read from, in Ingress mode

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.host, self.path, self.path_type)

    @classmethod
    def default(cls, config: Config) -> Route:
        """The one catch-all route of a config with no host or path: the single-pair proxy."""
        return cls(DEFAULT_ROUTE, "", "/", PREFIX, config)

    @property
    def catch_all(self) -> bool:
        return self.host == "" and self.path == "/" and self.path_type == PREFIX

    def describe(self) -> dict[str, Any]:
        """Where the route applies, for /config, ``check`` and ``routes``."""
        return {"name": self.name, "host": self.host or "*", "path": self.path, "path-type": self.path_type}


@dataclass(frozen=True, slots=True)
class Conflict:
    """A route that is not served because an earlier one has the same host, path and type."""

    route: str
    winner: str
    host: str
    path: str
    path_type: str

    def message(self) -> str:
        where = f"host {self.host or '*'} path {self.path} ({self.path_type})"
        return f"route {self.route} conflicts with {self.winner} on {where}; {self.winner} wins"


def parse_route(raw: Mapping[str, Any], *, name: str, order: tuple[Any, ...] = ()) -> Route:
    """A route from one flat mapping (a YAML document, a ConfigMap's data). Raises ConfigError
    listing every problem, the route keys' and the config's together."""
    if not isinstance(raw, Mapping):
        raise ConfigError(["the config must be a mapping of keys to values"])
    errors: list[str] = []
    own_name = raw.get("name")
    if own_name not in (None, "") and (not isinstance(own_name, str) or not own_name.strip()):
        errors.append(f"name: invalid value {own_name!r}; expected a non-empty string")
    host = _field(raw, "host", "", _parse_host, errors)
    path = _field(raw, "path", "/", _parse_path, errors)
    path_type = _field(raw, "path-type", PREFIX, _parse_path_type, errors)
    try:
        config = parse_config({k: v for k, v in raw.items() if k not in ROUTE_KEYS})
    except ConfigError as exc:
        errors += exc.errors
    if errors:
        raise ConfigError(errors)
    if path_type == PREFIX and path != "/":
        path = path.rstrip("/") or "/"
    if isinstance(own_name, str) and own_name.strip() in RESERVED:
        raise ConfigError([f"name: {own_name.strip()!r} is reserved (it labels requests no route took)"])
    named = isinstance(own_name, str) and bool(own_name.strip())
    chosen = own_name.strip() if named and isinstance(own_name, str) else name
    return Route(chosen, host, path, path_type, config, order, named)


@dataclass(frozen=True, slots=True)
class Rejected:
    """A route that failed to parse: its name and every problem, one line each."""

    name: str
    errors: list[str]


def parse_documents(
    origin: str, documents: Sequence[Any], *, order: tuple[Any, ...] = ()
) -> tuple[list[Route], list[Rejected]]:
    """The routes of one file's YAML documents (empty ones skipped): one route each, named
    ``origin`` for a single document and ``origin#N`` for the Nth of several, unless it
    names itself."""
    docs = [doc for doc in documents if doc is not None]
    routes: list[Route] = []
    rejected: list[Rejected] = []
    for number, doc in enumerate(docs, 1):
        name = origin if len(docs) == 1 else f"{origin}#{number}"
        try:
            routes.append(parse_route(doc, name=name, order=(*order, number)))
        except ConfigError as exc:
            rejected.append(Rejected(name, exc.errors))
    return routes, rejected


def settle_names(routes: Sequence[Route]) -> list[Route]:
    """A lone catch-all route that does not name itself is ``default``: a config of today
    (one pair, no host or path) keeps its metrics' ``route="default"`` whatever its source."""
    if len(routes) == 1 and routes[0].catch_all and not routes[0].named:
        return [replace(routes[0], name=DEFAULT_ROUTE)]
    return list(routes)


def _field(raw: Mapping[str, Any], key: str, default: str, parse: Any, errors: list[str]) -> str:
    value = raw.get(key)
    if value is None or value == "":
        return default
    try:
        result: str = parse(value)
    except ValueError as exc:
        errors.append(f"{key}: invalid value {value!r}; expected {exc}")
        return default
    return result


def _parse_host(value: Any) -> str:
    expected = "a host name such as shop.example.com, or *.example.com"
    if not isinstance(value, str):
        raise ValueError(expected)
    host = value.strip().lower().rstrip(".")
    name = host[2:] if host.startswith("*.") else host
    labels = name.split(".")
    if not name or "*" in name or not all(label and set(label) <= _HOST_LABEL for label in labels):
        raise ValueError(expected)
    if host.startswith("*.") and len(labels) < 2:
        raise ValueError(expected + " (a wildcard needs a domain: *.example.com)")
    return host


def _parse_path(value: Any) -> str:
    if not isinstance(value, str) or not value.startswith("/") or any(c in value for c in " ?#\t\r\n"):
        raise ValueError("a path starting with / (no query, no spaces)")
    return value


def _parse_path_type(value: Any) -> str:
    text = str(value).strip().lower()
    if text not in (PREFIX, EXACT):
        raise ValueError("prefix or exact")
    return text


def request_host(value: bytes | None) -> bytes:
    """A Host header as routes match it: without its port, in lower case."""
    if not value:
        return b""
    if value.startswith(b"["):  # an IPv6 literal: [::1]:8080
        end = value.find(b"]")
        return value[: end + 1].lower() if end > 0 else value.lower()
    colon = value.find(b":")
    return (value[:colon] if colon >= 0 else value).lower()


def request_path(target: bytes) -> bytes:
    """The path of a request target (no query), as routes match it."""
    query = target.find(b"?")
    path = target if query < 0 else target[:query]
    fragment = path.find(b"#")
    return (path if fragment < 0 else path[:fragment]) or b"/"


@dataclass(frozen=True, slots=True)
class _Entry(Generic[T]):
    """A candidate, as ``explain`` lists them: the matching rule written out, one route at a
    time (``lookup`` finds the same route by probing keys; test_routes checks they agree)."""

    path: bytes
    exact: bool
    route: Route
    value: T
    # What a longer path must start with to match a prefix route: the path and a "/", or
    # anything for "/" (b""); None for an exact route.
    prefix: bytes | None
    found: tuple[Route, T]

    @classmethod
    def of(cls, route: Route, value: T) -> _Entry[T]:
        path, exact = route.path.encode(), route.path_type == EXACT
        prefix = None if exact else (b"" if path == b"/" else path + b"/")
        return cls(path, exact, route, value, prefix, (route, value))

    def matches(self, path: bytes) -> bool:
        return path == self.path or (self.prefix is not None and path.startswith(self.prefix))


# Host classes, most specific first.
_EXACT_HOST, _WILDCARD, _ANY_HOST = 0, 1, 2


class RouteTable(Generic[T]):
    """Routes, precomputed for lookup; each carries a value (what the data path needs)."""

    def __init__(self, items: Iterable[tuple[Route, T]]) -> None:
        chosen: dict[tuple[str, str, str], tuple[Route, T]] = {}
        conflicts: list[Conflict] = []
        for route, value in sorted(items, key=lambda item: (item[0].order, item[0].name)):
            winner = chosen.get(route.key)
            if winner is not None:
                first = winner[0]
                conflicts.append(Conflict(route.name, first.name, route.host, route.path, route.path_type))
                continue
            chosen[route.key] = (route, value)
        self.items: tuple[tuple[Route, T], ...] = tuple(chosen.values())
        self.conflicts: tuple[Conflict, ...] = tuple(conflicts)
        only = self.items[0] if len(self.items) == 1 else None
        # One catch-all route (today's single-pair proxy): no Host or path to look at.
        self.only: T | None = only[1] if only is not None and only[0].catch_all else None

    @property
    def routes(self) -> tuple[Route, ...]:
        return tuple(route for route, _ in self.items)

    def build(self) -> RouteTable[T]:
        """Build the data path's lookup keys now, before the table is swapped in; else the
        first request does. A table only asked for its routes and conflicts (the control's,
        on each change) never builds them."""
        self._values  # noqa: B018 - computed and kept on first access
        return self

    @cached_property
    def _keys(self) -> _Keys[tuple[Route, T]]:
        return _Keys.of(self.items, lambda route, value: (route, value))

    @cached_property
    def _values(self) -> _Keys[T]:
        return _Keys.of(self.items, lambda route, value: value)

    def lookup(self, host: bytes, path: bytes) -> tuple[Route, T] | None:
        """The route for a request (``host`` as ``request_host`` gives it, ``path`` as
        ``request_path`` does), or None: no route matches."""
        return self._keys.find(host, path)

    def value_for(self, host: bytes | None, target: bytes) -> T | None:
        """The data path's lookup: the value of the route ``lookup`` finds for a raw Host
        header and an origin-form target, with ``request_host`` and ``request_path`` inlined
        for the common case: a call each was half the time of the lookup itself (test_routes
        checks that the two agree)."""
        if not host or host[0] == 0x5B:  # none, or an IPv6 literal: [::1]:8080
            host = request_host(host)
        else:
            colon = host.find(b":")
            host = (host if colon < 0 else host[:colon]).lower()
        query = target.find(b"?")
        path = target if query < 0 else target[:query]
        if not path or path.find(b"#") >= 0:  # (find: ``in`` on bytes is twice as slow)
            path = request_path(path)
        return self._values.find(host, path)

    @cached_property
    def _index(self) -> _Index[T]:
        exact: dict[bytes, list[tuple[int, _Entry[T]]]] = {}
        wildcard: dict[bytes, list[tuple[int, _Entry[T]]]] = {}
        any_host: list[tuple[int, _Entry[T]]] = []
        for route, value in self.items:
            entry = _Entry.of(route, value)
            if not route.host:
                any_host.append((_ANY_HOST, entry))
            elif route.host.startswith("*."):
                wildcard.setdefault(route.host[1:].encode(), []).append((_WILDCARD, entry))
            else:
                exact.setdefault(route.host.encode(), []).append((_EXACT_HOST, entry))
        # Each host's candidates, in precedence order, include the wildcard and any-host
        # routes that also cover it.
        return _Index(
            {host: _ordered(own + wildcard.get(_suffix(host), []) + any_host) for host, own in exact.items()},
            {suffix: _ordered(own + any_host) for suffix, own in wildcard.items()},
            _ordered(any_host),
        )

    def candidates(self, host: bytes) -> list[_Entry[T]]:
        """The routes ``host`` may get, in the order ``lookup`` prefers them: for ``explain``."""
        index = self._index
        entries = index.exact.get(host)
        if entries is not None:
            return entries
        dot = host.find(b".")
        if dot > 0:
            entries = index.wildcard.get(host[dot:])
            if entries is not None:
                return entries
        return index.any_host

    def explain(self, host: bytes, path: bytes) -> list[str]:
        """Why ``lookup`` picks what it picks: each candidate in order, and whether it matched
        (test_routes checks the two agree)."""
        lines = []
        for entry in self.candidates(host):
            route = entry.route
            verdict = "matches" if entry.matches(path) else "does not match"
            lines.append(f"{route.name} (host {route.host or '*'}, {route.path_type} {route.path}) {verdict}")
            if verdict == "matches":
                break
        return lines


# Between a host and a path in a lookup key: a route's host never holds it, and neither can a
# request's Host (llhttp ends a header at a line feed), so no host and path run together
# into another's ("a.example/b" + "/c" is not "a.example" + "/b/c").
SEPARATOR: Final = b"\n"


@dataclass(frozen=True, slots=True)
class _Keys(Generic[V]):
    """The lookup's dicts: what each route gives (its value, or its route and value) by its
    host (as written: "", "*.example.com" or an exact name) and path together."""

    exact: dict[bytes, V]
    prefix: dict[bytes, V]
    longest: int  # the longest prefix path: no probe can match past it
    lengths: frozenset[int]  # the prefix paths' lengths: a probe of another length cannot match
    wildcard: bool  # some route has a wildcard host
    any_host: bool  # some route is for any host

    @classmethod
    def of(cls, items: Iterable[tuple[Route, T]], give: Callable[[Route, T], V]) -> _Keys[V]:
        exact: dict[bytes, V] = {}
        prefix: dict[bytes, V] = {}
        wildcard, any_host = False, False
        lengths: set[int] = set()
        for route, value in items:
            path = route.path.encode()
            key = route.host.encode() + SEPARATOR + path
            if route.path_type == EXACT:
                exact[key] = give(route, value)
            else:
                prefix[key] = give(route, value)
                lengths.add(len(path))
            wildcard = wildcard or route.host.startswith("*.")
            any_host = any_host or not route.host
        return cls(exact, prefix, max(lengths, default=0), frozenset(lengths), wildcard, any_host)

    def find(self, host: bytes, path: bytes) -> V | None:
        """The host's own routes first, then its wildcard's, then those for any host (see
        the module's docstring)."""
        found = self.probe(host + SEPARATOR, path)
        if found is None and self.wildcard:
            dot = host.find(b".")
            if dot > 0:
                found = self.probe(b"*" + host[dot:] + SEPARATOR, path)
        if found is None and self.any_host and host:  # no host: the first probe was this one
            found = self.probe(SEPARATOR, path)
        return found

    def probe(self, host: bytes, path: bytes) -> V | None:
        """The route of one host key (with its SEPARATOR) for ``path``: an exact route for the
        whole path; else the longest prefix route whose path is the whole path, or a part of it
        that ends at a ``/``; else the host's ``/`` prefix route."""
        exact, prefix = self.exact, self.prefix
        if exact:
            found = exact.get(host + path)
            if found is not None:
                return found
        if not prefix:
            return None
        lengths = self.lengths
        if len(path) in lengths:
            found = prefix.get(host + path)
            if found is not None:
                return found
        # Each "/" at i >= 1 ends a prefix path[:i] that matches path by whole segments; only
        # the lengths some route has are probed, so a path of many "/" costs no more.
        cut = path.rfind(b"/", 1, self.longest + 1)
        while cut > 0:
            if cut in lengths:
                found = prefix.get(host + path[:cut])
                if found is not None:
                    return found
            cut = path.rfind(b"/", 1, cut)
        return prefix.get(host + b"/") if 1 in lengths else None


@dataclass(frozen=True, slots=True)
class _Index(Generic[T]):
    """Each host's candidates, in the order they are tried."""

    exact: dict[bytes, list[_Entry[T]]]  # by exact host
    wildcard: dict[bytes, list[_Entry[T]]]  # by suffix: ".example.com" for "*.example.com"
    any_host: list[_Entry[T]]  # a host with neither


def _suffix(host: bytes) -> bytes:
    dot = host.find(b".")
    return host[dot:] if dot > 0 else b""


def _ordered(entries: list[tuple[int, _Entry[T]]]) -> list[_Entry[T]]:
    """Most specific host first; then the longest path; then exact before prefix."""
    entries.sort(key=lambda pair: (pair[0], -len(pair[1].path), not pair[1].exact))
    return [entry for _, entry in entries]
