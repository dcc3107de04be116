"""A fake Kubernetes API server for tests: ConfigMaps, Services, Secrets, Ingresses and
Leases (all with watch), Endpoints and Events.

It speaks the real wire protocol -- JSON objects, ``Status`` error bodies, one global
``resourceVersion``, chunked watch streams with replay, ``410 Expired`` after compaction,
bookmarks -- so tests drive the real ``kubernetes`` client library end to end. Test-only
controls (compaction, cutting watches, injected failures, downtime) are Python methods;
compaction, cutting and failures are also reachable over HTTP under ``/_test/``.

Lists and watches take a namespace or all of them (``/api/v1/configmaps``), a field
selector and a label selector. As the real watch cache does, a watch sends a change that
moves an object into its selection as ADDED, and one that moves it out as DELETED.

Simplifications, on purpose: one fixed bearer token; strategic merge patch is applied as a
JSON merge patch (exact for ConfigMaps, whose fields hold no merge-keyed lists); field
selectors support ``metadata.name`` and ``metadata.namespace`` equality only; Services and
Ingresses have a ``/status`` subresource (a write there changes only ``status``, a write
to the object everything else), and nothing else checks a schema;
``creationTimestamp`` has the real one-second resolution, and tests may set it.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import re
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

Obj = dict[str, Any]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

TOKEN = "fake-token"
# What a real API server says when a v1 Endpoints object is read (v1.33+).
ENDPOINTS_WARNING = '299 - "v1 Endpoints is deprecated in v1.33+; use discovery.k8s.io/v1 EndpointSlice"'

_ALL = {"list", "watch", "get", "create", "update", "patch", "delete"}


@dataclass(frozen=True)
class _Kind:
    kind: str
    api_version: str  # "v1" for the core group, else "GROUP/VERSION"
    verbs: frozenset[str]
    status: bool = False  # has a /status subresource: the main resource's writes keep status


_RESOURCES = {
    "configmaps": _Kind("ConfigMap", "v1", frozenset(_ALL)),
    "endpoints": _Kind("Endpoints", "v1", frozenset({"list", "get"})),
    "events": _Kind("Event", "v1", frozenset({"list", "get", "create"})),
    "services": _Kind("Service", "v1", frozenset(_ALL), status=True),
    "secrets": _Kind("Secret", "v1", frozenset(_ALL)),
    "ingresses": _Kind("Ingress", "networking.k8s.io/v1", frozenset(_ALL), status=True),
    "leases": _Kind("Lease", "coordination.k8s.io/v1", frozenset(_ALL)),
}
_KINDS = {resource: kind.kind for resource, kind in _RESOURCES.items()}
# Which verbs each resource serves, as in RBAC terms.
_VERBS = {resource: kind.verbs for resource, kind in _RESOURCES.items()}
_REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    410: "Expired",
    415: "UnsupportedMediaType",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}
_PATCH_TYPES = {
    "application/merge-patch+json",
    "application/strategic-merge-patch+json",
    "application/json-patch+json",
}
_CONFIGMAP_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
_MICRO_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}(Z|[+-]\d\d:\d\d)$")  # RFC3339Micro
_TRUE = {"1", "true", "True"}


def status_body(code: int, message: str, *, reason: str | None = None, **details: str) -> Obj:
    """A Kubernetes ``Status`` object, as sent with every API error."""
    body: Obj = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason or _REASONS.get(code, "Unknown"),
        "code": code,
    }
    if details:
        body["details"] = details
    return body


class ApiError(Exception):
    """Raised by handlers; the middleware turns it into a ``Status`` response."""

    def __init__(self, code: int, message: str, *, reason: str | None = None, **details: str) -> None:
        super().__init__(message)
        self.body = status_body(code, message, reason=reason, **details)
        self.code = code
        self.headers: dict[str, str] = {}


@dataclass
class _Failure:
    """An injected failure: the next ``remaining`` matching requests get ``status``."""

    status: int
    remaining: int
    verb: str | None
    retry_after: int | None
    resource: str | None = None  # e.g. "ingresses"; a subresource counts as its resource


@dataclass(frozen=True)
class _Event:
    rv: int
    type: str
    resource: str
    namespace: str
    name: str
    obj: Obj
    old: Obj | None  # the object before this change; None when it was created


_CUT = object()  # queued to a watch to make its handler return after an abort


@dataclass(frozen=True)
class _Selection:
    """What a list or watch asks for: a resource in a namespace (None: all), by selectors."""

    resource: str
    namespace: str | None
    fields: dict[str, str]
    labels: list[Requirement]

    @classmethod
    def of(cls, request: web.Request) -> _Selection:
        return cls(
            request.match_info["resource"],
            request.match_info.get("namespace"),
            _parse_field_selector(request.query.get("fieldSelector", "")),
            parse_label_selector(request.query.get("labelSelector", "")),
        )

    def selects(self, resource: str, obj: Obj) -> bool:
        meta = obj["metadata"]
        return (
            resource == self.resource
            and self.namespace in (None, meta["namespace"])
            and _fields_match(obj, self.fields)
            and all(requirement(meta.get("labels") or {}) for requirement in self.labels)
        )

    def view(self, event: _Event) -> tuple[str, Obj] | None:
        """The event as a watch of this selection sees it, if at all: as the API server's
        watch cache does, entering the selection is ADDED and leaving it is DELETED."""
        was = event.old is not None and self.selects(event.resource, event.old)
        now = event.type != "DELETED" and self.selects(event.resource, event.obj)
        if now:
            return ("MODIFIED" if was else "ADDED"), event.obj
        if was:
            assert event.old is not None
            gone = copy.deepcopy(event.old)  # the last state it was selected in, at the new rv
            gone["metadata"]["resourceVersion"] = str(event.rv)
            return "DELETED", gone
        return None


@dataclass(eq=False)
class _Watch:
    request: web.Request
    selection: _Selection
    queue: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)


class FakeKube:
    """The fake API server. ``start()``/``stop()`` may be repeated; the port is kept."""

    def __init__(self, *, bookmark_interval: float = 0.2, token: str = TOKEN) -> None:
        self.bookmark_interval = bookmark_interval  # seconds between BOOKMARKs when allowed
        self.token = token
        self.expire_with_http_status = False  # 410 as an HTTP status instead of an ERROR event
        self.stall_watches = False  # watches send nothing and never end: a half-open stream
        self.requests: Counter[str] = Counter()  # per verb: get, list, watch, patch, ...
        self.responses: Counter[int] = Counter()  # per HTTP status
        self.watch_queries: list[dict[str, str]] = []  # query of every watch request
        self.commit_times: dict[int, float] = {}  # resourceVersion -> time.perf_counter()
        self.objects: dict[tuple[str, str, str], Obj] = {}  # (resource, ns, name) -> object
        self.port = 0
        self.kubeconfig: Path | None = None
        self._rv = 1
        self._compacted = 1  # watches from a resourceVersion below this get 410 Expired
        self._history: list[_Event] = []
        self._watches: set[_Watch] = set()
        self._failures: list[_Failure] = []
        self._runner: web.AppRunner | None = None

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def resource_version(self) -> str:
        return str(self._rv)

    async def start(self) -> None:
        """Listen on 127.0.0.1: a random free port the first time, the same one after."""
        runner = web.AppRunner(self._build_app(), shutdown_timeout=1.0, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port, reuse_address=True).start()
        self.port = runner.addresses[0][1]
        self._runner = runner

    async def stop(self) -> None:
        """Simulate the API going down: cut watches, close every connection and the socket."""
        if self._runner is None:
            return
        self.cut_watches()
        runner, self._runner = self._runner, None
        await runner.cleanup()

    def write_kubeconfig(self, path: Path, *, namespace: str = "default") -> Path:
        """A kubeconfig for this server: plain http, a bearer token, a namespaced context."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {"token": self.token}}],
            "contexts": [
                {
                    "name": "fake",
                    "context": {"cluster": "fake", "user": "fake", "namespace": namespace},
                }
            ],
            "current-context": "fake",
        }
        path.write_text(json.dumps(config, indent=2))  # JSON is YAML
        self.kubeconfig = path
        return path

    # -- test controls -----------------------------------------------------------------

    def compact(self) -> None:
        """Forget all history: a watch from any resourceVersion seen so far gets 410."""
        self._compacted = self._rv
        self._history.clear()

    def cut_watches(self) -> int:
        """Abort every open watch connection at the transport, as a network failure would."""
        for watch in list(self._watches):
            if watch.request.transport is not None:
                watch.request.transport.abort()
            watch.queue.put_nowait(_CUT)
        return len(self._watches)

    def fail_next(
        self,
        count: int = 1,
        *,
        status: int = 500,
        verb: str | None = None,
        retry_after: int | None = None,
        resource: str | None = None,
    ) -> None:
        """Answer the next ``count`` requests (of ``verb`` on ``resource``, if given) with ``status``."""
        self._failures.append(_Failure(status, count, verb, retry_after, resource))

    @property
    def watching(self) -> int:
        """How many watch streams are open right now."""
        return len(self._watches)

    # -- server-side writes, as another client would make them -------------------------

    def configmap(self, name: str, *, namespace: str = "default") -> Obj | None:
        obj = self.objects.get(("configmaps", namespace, name))
        return copy.deepcopy(obj) if obj is not None else None

    def put_configmap(
        self,
        name: str,
        data: dict[str, str] | None,
        *,
        namespace: str = "default",
        annotations: dict[str, str] | None = None,
        labels: dict[str, str] | None = None,
        created: str | None = None,
    ) -> Obj:
        """Create or replace a ConfigMap (``data=None``: without the field); emits ADDED or
        MODIFIED. ``created`` sets the creationTimestamp of a new one (``"2024-01-02T03:04:05Z"``)."""
        old = self.objects.get(("configmaps", namespace, name))
        obj = old_or_new(old, "configmaps", namespace, name)
        obj.pop("data", None)
        if data is not None:
            obj["data"] = dict(data)
        if annotations is not None:
            obj["metadata"]["annotations"] = dict(annotations)
        if labels is not None:
            obj["metadata"]["labels"] = dict(labels)
        if created is not None and old is None:
            obj["metadata"]["creationTimestamp"] = created
        return self._commit(obj, "MODIFIED" if old else "ADDED")

    def patch_configmap(self, name: str, data: dict[str, str | None], *, namespace: str = "default") -> Obj:
        """Merge ``data`` into an existing ConfigMap (None deletes a key); emits MODIFIED."""
        obj = copy.deepcopy(self._get("configmaps", namespace, name))
        return self._commit(merge_patch(obj, {"data": data}), "MODIFIED")

    def delete_configmap(self, name: str, *, namespace: str = "default") -> None:
        self._delete("configmaps", namespace, name)

    def put_endpoints(self, name: str, subsets: list[Obj], *, namespace: str = "default") -> Obj:
        old = self.objects.get(("endpoints", namespace, name))
        obj = old_or_new(old, "endpoints", namespace, name)
        obj["subsets"] = copy.deepcopy(subsets)
        return self._commit(obj, "MODIFIED" if old else "ADDED")

    def get_object(self, resource: str, name: str, *, namespace: str = "default") -> Obj | None:
        obj = self.objects.get((resource, namespace, name))
        return copy.deepcopy(obj) if obj is not None else None

    def put_object(self, resource: str, obj: Obj, *, created: str | None = None) -> Obj:
        """Create or replace any object from its JSON (kind/apiVersion are set from
        ``resource``; ``metadata.namespace`` defaults to "default"), as ``kubectl apply``
        would leave it; emits ADDED or MODIFIED. A replace keeps ``status`` unless given."""
        meta = obj.get("metadata") or {}
        namespace, name = meta.get("namespace", "default"), meta["name"]
        old = self.objects.get((resource, namespace, name))
        new = old_or_new(old, resource, namespace, name)
        status = new.get("status")
        for key in list(new):
            if key not in ("metadata", "kind", "apiVersion"):
                del new[key]
        new.update(
            {k: copy.deepcopy(v) for k, v in obj.items() if k not in ("metadata", "kind", "apiVersion")}
        )
        if status is not None and "status" not in obj:
            new["status"] = status
        for key in ("labels", "annotations", "ownerReferences"):
            new["metadata"].pop(key, None)
            if key in meta:
                new["metadata"][key] = copy.deepcopy(meta[key])
        if created is not None and old is None:
            new["metadata"]["creationTimestamp"] = created
        return self._commit(new, "MODIFIED" if old else "ADDED")

    def patch_object(self, resource: str, name: str, patch: Obj, *, namespace: str = "default") -> Obj:
        """Merge-patch an existing object (``null`` deletes a key); emits MODIFIED."""
        obj = copy.deepcopy(self._get(resource, namespace, name))
        return self._commit(merge_patch(obj, patch), "MODIFIED")

    def delete_object(self, resource: str, name: str, *, namespace: str = "default") -> None:
        self._delete(resource, namespace, name)

    def list_objects(self, resource: str, *, namespace: str | None = "default") -> list[Obj]:
        """The objects of a resource in ``namespace`` (None: all), by namespace and name."""
        return [
            copy.deepcopy(obj)
            for (res, ns, _), obj in sorted(self.objects.items())
            if res == resource and namespace in (None, ns)
        ]

    # -- storage -------------------------------------------------------------------------

    def _commit(self, obj: Obj, etype: str) -> Obj:
        """Store (or, for DELETED, drop) an object under a new resourceVersion; notify."""
        self._rv += 1
        meta = obj["metadata"]
        meta["resourceVersion"] = str(self._rv)
        key = (_resource_of(obj), meta["namespace"], meta["name"])
        old = copy.deepcopy(self.objects.get(key))
        if etype == "DELETED":
            self.objects.pop(key, None)
        else:
            self.objects[key] = obj
        self.commit_times[self._rv] = time.perf_counter()
        event = _Event(self._rv, etype, *key, copy.deepcopy(obj), old)
        self._history.append(event)
        for watch in self._watches:
            if seen := watch.selection.view(event):
                watch.queue.put_nowait(seen)
        return copy.deepcopy(obj)

    def _get(self, resource: str, namespace: str, name: str) -> Obj:
        obj = self.objects.get((resource, namespace, name))
        if obj is None:
            raise ApiError(404, f'{resource} "{name}" not found', name=name, kind=resource)
        return obj

    def _delete(self, resource: str, namespace: str, name: str) -> Obj:
        return self._commit(copy.deepcopy(self._get(resource, namespace, name)), "DELETED")

    # -- HTTP ------------------------------------------------------------------------------

    def _build_app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware])
        for root in ("/api/{version}", "/apis/{group}/{version}"):  # the core group, named groups
            base = root + "/namespaces/{namespace}/{resource}"
            app.router.add_route("GET", root + "/{resource}", self._list_or_watch)  # all namespaces
            app.router.add_route("GET", base, self._list_or_watch)
            app.router.add_route("POST", base, self._create)
            app.router.add_route("GET", base + "/{name}", self._read)
            app.router.add_route("PUT", base + "/{name}", self._replace)
            app.router.add_route("PATCH", base + "/{name}", self._patch)
            app.router.add_route("DELETE", base + "/{name}", self._delete_handler)
            app.router.add_route("GET", base + "/{name}/{subresource:status}", self._read)
            app.router.add_route("PUT", base + "/{name}/{subresource:status}", self._replace)
            app.router.add_route("PATCH", base + "/{name}/{subresource:status}", self._patch)
        app.router.add_route("POST", "/_test/compact", self._control_compact)
        app.router.add_route("POST", "/_test/cut", self._control_cut)
        app.router.add_route("POST", "/_test/fail", self._control_fail)
        app.router.add_route("GET", "/_test/requests", self._control_requests)
        return app

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/_test/"):
            return await handler(request)
        verb = _verb_of(request)
        self.requests[verb] += 1
        try:
            self._check(request, verb)
            response = await handler(request)
        except ApiError as exc:
            response = web.json_response(exc.body, status=exc.code, headers=exc.headers)
        self.responses[response.status] += 1
        return response

    def _check(self, request: web.Request, verb: str) -> None:
        """Authenticate, authorise the verb, then apply any injected failure."""
        if request.headers.get("Authorization", "").lower() != f"bearer {self.token}".lower():
            raise ApiError(401, "Unauthorized")
        resource = request.match_info.get("resource", "")
        info = request.match_info
        api_version = f"{info['group']}/{info['version']}" if "group" in info else info.get("version")
        if resource not in _RESOURCES or _RESOURCES[resource].api_version != api_version:
            raise ApiError(404, "the server could not find the requested resource")
        if info.get("subresource") and not _RESOURCES[resource].status:
            raise ApiError(404, "the server could not find the requested resource")
        if verb not in _VERBS.get(resource, set()):
            if resource not in _VERBS:
                raise ApiError(404, "the server could not find the requested resource")
            raise ApiError(405, f"{verb} is not supported on {resource}")
        failure = next(
            (f for f in self._failures if f.verb in (None, verb) and f.resource in (None, resource)), None
        )
        if failure is None:
            return
        failure.remaining -= 1
        if failure.remaining <= 0:
            self._failures.remove(failure)
        raise _injected(failure)

    async def _list_or_watch(self, request: web.Request) -> web.StreamResponse:
        selection = _Selection.of(request)
        if request.query.get("watch") in _TRUE:
            return await self._watch(request, _Watch(request, selection))
        items = self._select(selection)
        for obj in items:  # list items carry no kind/apiVersion, as on a real server
            obj.pop("kind", None)
            obj.pop("apiVersion", None)
        kind = _RESOURCES[selection.resource]
        meta = {"resourceVersion": self.resource_version}
        listed = {"kind": kind.kind + "List", "apiVersion": kind.api_version, "metadata": meta}
        return web.json_response(listed | {"items": items})

    async def _read(self, request: web.Request) -> web.Response:
        resource, namespace, name = _key_of(request)
        response = web.json_response(self._get(resource, namespace, name))
        if resource == "endpoints":
            response.headers["Warning"] = ENDPOINTS_WARNING
        return response

    async def _create(self, request: web.Request) -> web.Response:
        resource, namespace = request.match_info["resource"], request.match_info["namespace"]
        body = await _json_body(request)
        meta = body.setdefault("metadata", {})
        if meta.get("namespace", namespace) != namespace:
            raise ApiError(400, "the namespace of the object does not match the request")
        if "name" not in meta and "generateName" in meta:
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        name = meta.get("name")
        if not name:
            raise ApiError(422, "metadata.name: Required value", kind=resource)
        if (resource, namespace, name) in self.objects:
            raise ApiError(409, f'{resource} "{name}" already exists', reason="AlreadyExists")
        obj = old_or_new(None, resource, namespace, name)
        obj.update({k: v for k, v in body.items() if k not in ("metadata", "kind", "apiVersion")})
        obj["metadata"].update({k: meta[k] for k in ("labels", "annotations") if k in meta})
        _validate(obj)
        return web.json_response(self._commit(obj, "ADDED"), status=201)

    async def _replace(self, request: web.Request) -> web.Response:
        resource, namespace, name = _key_of(request)
        old = self._get(resource, namespace, name)
        body = await _json_body(request)
        if body.get("metadata", {}).get("name", name) != name:
            raise ApiError(400, "the name of the object does not match the name on the URL")
        new = old_or_new(old, resource, namespace, name)
        new.update({k: v for k, v in body.items() if k not in ("metadata", "kind", "apiVersion")})
        for key in ("labels", "annotations", "resourceVersion"):
            if key in body.get("metadata", {}):
                new["metadata"][key] = body["metadata"][key]
        return self._update(old, _split_status(request, old, new))

    async def _patch(self, request: web.Request) -> web.Response:
        resource, namespace, name = _key_of(request)
        old = self._get(resource, namespace, name)
        content_type = request.content_type
        if content_type not in _PATCH_TYPES:
            raise ApiError(415, f"the body of the request was in an unknown format: {content_type}")
        patch = await _json_body(request, expect=list if "json-patch" in content_type else dict)
        if content_type == "application/json-patch+json":
            new = json_patch(old, patch)
        else:
            new = merge_patch(old, patch)
        return self._update(old, _split_status(request, old, new))

    def _update(self, old: Obj, new: Obj) -> web.Response:
        """Write ``new`` over ``old``, honouring a ``metadata.resourceVersion`` precondition."""
        name = old["metadata"]["name"]
        wanted = new["metadata"].get("resourceVersion")
        if wanted and wanted != old["metadata"]["resourceVersion"]:
            raise ApiError(
                409,
                f'Operation cannot be fulfilled on {_resource_of(old)} "{name}": the object has '
                "been modified; please apply your changes to the latest version and try again",
                reason="Conflict",
                name=name,
                kind=_resource_of(old),
            )
        for key in ("name", "namespace", "uid", "creationTimestamp"):
            new["metadata"][key] = old["metadata"][key]
        new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
        if new == old:  # a no-op write keeps the resourceVersion and emits no event
            return web.json_response(old)
        _validate(new)
        return web.json_response(self._commit(new, "MODIFIED"))

    async def _delete_handler(self, request: web.Request) -> web.Response:
        resource, namespace, name = _key_of(request)
        obj = self._delete(resource, namespace, name)
        details = {"name": name, "kind": resource, "uid": obj["metadata"]["uid"]}
        return web.json_response(
            {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"} | {"details": details}
        )

    # -- watch -------------------------------------------------------------------------------

    async def _watch(self, request: web.Request, watch: _Watch) -> web.StreamResponse:
        self.watch_queries.append(dict(request.query))
        since = request.query.get("resourceVersion", "")
        if not since.isdigit() and since != "":
            raise ApiError(400, f"invalid resourceVersion {since!r}")
        if since not in ("", "0") and int(since) < self._compacted:
            message = f"too old resource version: {since} ({self._compacted})"
            if self.expire_with_http_status:
                raise ApiError(410, message, reason="Expired")
            initial = [("ERROR", status_body(410, message, reason="Expired"))]
        else:
            initial = self._initial_events(watch, since)
            self._watches.add(watch)  # no await since the replay: no event can slip between
        try:
            return await self._stream(request, watch, initial)
        finally:
            self._watches.discard(watch)

    def _select(self, selection: _Selection) -> list[Obj]:
        objects = self.list_objects(selection.resource, namespace=selection.namespace)
        return [obj for obj in objects if selection.selects(selection.resource, obj)]

    def _initial_events(self, watch: _Watch, since: str) -> list[tuple[str, Obj]]:
        """Replay history after ``since``; without one, the current objects as ADDED."""
        if since in ("", "0"):
            return [("ADDED", obj) for obj in self._select(watch.selection)]
        after = (watch.selection.view(e) for e in self._history if e.rv > int(since))
        return [seen for seen in after if seen]

    async def _stream(
        self, request: web.Request, watch: _Watch, initial: list[tuple[str, Obj]]
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        try:
            for etype, obj in initial:
                await _send(response, etype, obj)
            if watch in self._watches:
                await self._follow(response, watch)
        except ConnectionError:
            pass  # the client went away, or cut_watches() aborted the transport
        return response

    async def _follow(self, response: web.StreamResponse, watch: _Watch) -> None:
        """Send matching events, and BOOKMARKs while idle, until timeoutSeconds or a cut."""
        bookmarks = watch.request.query.get("allowWatchBookmarks") in _TRUE
        loop = asyncio.get_running_loop()
        deadline = loop.time() + float(watch.request.query.get("timeoutSeconds", "1800"))
        while self.stall_watches or (remaining := deadline - loop.time()) > 0:
            wait = None if self.stall_watches else remaining
            if bookmarks and not self.stall_watches:
                wait = min(remaining, self.bookmark_interval)
            try:
                async with asyncio.timeout(wait):
                    item = await watch.queue.get()
            except TimeoutError:
                if bookmarks and not self.stall_watches:  # idle, and every event sent: safe
                    await _send(response, "BOOKMARK", self._bookmark(watch.selection.resource))
                continue
            if item is _CUT:
                return
            if not self.stall_watches:
                await _send(response, *item)

    def _bookmark(self, resource: str) -> Obj:
        meta = {"resourceVersion": self.resource_version}
        return {"kind": _KINDS[resource], "apiVersion": _RESOURCES[resource].api_version, "metadata": meta}

    # -- /_test/ control endpoints ---------------------------------------------------------

    async def _control_compact(self, request: web.Request) -> web.Response:
        self.compact()
        return web.json_response({"compacted": self.resource_version})

    async def _control_cut(self, request: web.Request) -> web.Response:
        return web.json_response({"cut": self.cut_watches()})

    async def _control_fail(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.fail_next(
            int(body.get("count", 1)),
            status=int(body.get("status", 500)),
            verb=body.get("verb"),
            retry_after=body.get("retry_after"),
        )
        return web.json_response({"ok": True})

    async def _control_requests(self, request: web.Request) -> web.Response:
        return web.json_response(dict(self.requests))


# -- helpers ------------------------------------------------------------------------------


def old_or_new(old: Obj | None, resource: str, namespace: str, name: str) -> Obj:
    """A copy of ``old`` or a fresh object with server-set metadata."""
    if old is not None:
        return copy.deepcopy(old)
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    meta = {"name": name, "namespace": namespace, "uid": str(uuid.uuid4())}
    meta["creationTimestamp"] = now
    return {"kind": _KINDS[resource], "apiVersion": _RESOURCES[resource].api_version, "metadata": meta}


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: objects merge recursively, null deletes a key."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def json_patch(doc: Obj, ops: list[Obj]) -> Obj:
    """RFC 6902 JSON patch: add, remove, replace, move, copy, test. Errors are 422."""
    result: Any = copy.deepcopy(doc)
    try:
        for op in ops:
            result = _apply_op(result, op)
    except (KeyError, IndexError, ValueError, TypeError) as exc:
        raise ApiError(422, f"the server rejected our request: {exc!r}") from exc
    if not isinstance(result, dict):
        raise ApiError(422, "the patched document is not an object")
    return result


def _apply_op(doc: Any, op: Obj) -> Any:
    kind, path = op["op"], _pointer(op["path"])
    if kind == "test":
        if _get_at(doc, path) != op["value"]:
            raise ValueError(f"test failed at {op['path']}")
        return doc
    if kind == "remove":
        return _remove_at(doc, path)
    if kind == "replace":
        _get_at(doc, path)  # must exist
        return _add_at(_remove_at(doc, path), path, copy.deepcopy(op["value"]))
    if kind == "add":
        return _add_at(doc, path, copy.deepcopy(op["value"]))
    source = _pointer(op["from"])
    value = copy.deepcopy(_get_at(doc, source))
    if kind == "move":
        doc = _remove_at(doc, source)
    elif kind != "copy":
        raise ValueError(f"unknown op {kind}")
    return _add_at(doc, path, value)


def _pointer(pointer: str) -> list[str]:
    if pointer == "":
        return []
    if not pointer.startswith("/"):
        raise ValueError(f"bad JSON pointer {pointer!r}")
    return [part.replace("~1", "/").replace("~0", "~") for part in pointer[1:].split("/")]


def _get_at(doc: Any, path: list[str]) -> Any:
    for part in path:
        doc = doc[int(part)] if isinstance(doc, list) else doc[part]
    return doc


def _add_at(doc: Any, path: list[str], value: Any) -> Any:
    if not path:
        return value
    parent, key = _get_at(doc, path[:-1]), path[-1]
    if isinstance(parent, list):
        parent.insert(len(parent) if key == "-" else int(key), value)
    else:
        parent[key] = value
    return doc


def _remove_at(doc: Any, path: list[str]) -> Any:
    if not path:
        raise ValueError("cannot remove the whole document")
    parent, key = _get_at(doc, path[:-1]), path[-1]
    if isinstance(parent, list):
        parent.pop(int(key))
    else:
        del parent[key]
    return doc


def _validate(obj: Obj) -> None:
    """The checks a real server makes that our client could get wrong: ConfigMap keys, and
    a Lease's times (a MicroTime must have exactly six fraction digits, or Go's parser
    refuses it)."""
    if obj["kind"] == "Lease":
        for key in ("acquireTime", "renewTime"):
            value = (obj.get("spec") or {}).get(key)
            if value is not None and not _MICRO_TIME.match(str(value)):
                name = obj["metadata"]["name"]
                message = f'Lease "{name}" is invalid: spec.{key}: cannot parse {value!r}'
                raise ApiError(422, message, kind="Lease")
    if obj["kind"] != "ConfigMap":
        return
    for key, value in (obj.get("data") or {}).items():
        if not _CONFIGMAP_KEY.match(key) or not isinstance(value, str):
            name = obj["metadata"]["name"]
            raise ApiError(422, f'ConfigMap "{name}" is invalid: data[{key}]', kind="ConfigMap")


def _injected(failure: _Failure) -> ApiError:
    error = ApiError(failure.status, f"injected failure ({failure.status})")
    if failure.retry_after is not None:  # as API Priority and Fairness sends with a 429
        error.body["details"] = {"retryAfterSeconds": failure.retry_after}
        error.headers["Retry-After"] = str(failure.retry_after)
    return error


def _verb_of(request: web.Request) -> str:
    if request.method == "GET":
        if "name" in request.match_info:
            return "get"
        return "watch" if request.query.get("watch") in _TRUE else "list"
    return {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(
        request.method, request.method.lower()
    )


def _split_status(request: web.Request, old: Obj, new: Obj) -> Obj:
    """As for a resource with a status subresource: a write to ``/status`` changes only
    ``status``, and a write to the object itself changes everything but ``status``."""
    if not _RESOURCES[request.match_info["resource"]].status:
        return new
    if request.match_info.get("subresource") == "status":
        result = copy.deepcopy(old)
        result["metadata"]["resourceVersion"] = new["metadata"].get("resourceVersion")
        result.pop("status", None)
        if "status" in new:
            result["status"] = new["status"]
        return result
    result = copy.deepcopy(new)
    result.pop("status", None)
    if "status" in old:
        result["status"] = copy.deepcopy(old["status"])
    return result


def _key_of(request: web.Request) -> tuple[str, str, str]:
    info = request.match_info
    return info["resource"], info["namespace"], info["name"]


def _resource_of(obj: Obj) -> str:
    return next(res for res, kind in _KINDS.items() if kind == obj["kind"])


def _parse_field_selector(selector: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for term in filter(None, selector.split(",")):
        key, _, value = term.partition("==") if "==" in term else term.partition("=")
        if key not in ("metadata.name", "metadata.namespace") or "!" in key:
            raise ApiError(400, f'field label not supported: "{key}"')
        fields[key] = value
    return fields


Requirement = Callable[[dict[str, str]], bool]
_LABEL_KEY = r"(?:[a-z0-9](?:[-a-z0-9.]{0,251}[a-z0-9])?/)?[A-Za-z0-9](?:[-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_LABEL_VALUE = re.compile(r"(?:[A-Za-z0-9](?:[-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?")
_EXISTS = re.compile(rf"(!?)\s*({_LABEL_KEY})")
_EQUALS = re.compile(rf"({_LABEL_KEY})\s*(==|=|!=)\s*(\S*)")
_IN = re.compile(rf"({_LABEL_KEY})\s+(in|notin)\s*\(([^()]*)\)")


def parse_label_selector(selector: str) -> list[Requirement]:
    """A label selector -> one predicate per requirement; 400 if malformed, as the API says.

    The grammar of ``labels.Parse``: ``key``, ``!key``, ``key=value`` (or ``==``),
    ``key!=value``, ``key in (a,b)``, ``key notin (a,b)``; requirements are ANDed. A
    negative one (``!=``, ``notin``) also matches an object without the label.
    """
    if not selector.strip():
        return []
    return [_requirement(term.strip()) for term in re.split(r",(?![^()]*\))", selector)]


def _requirement(term: str) -> Requirement:
    if match := _EXISTS.fullmatch(term):
        negate, key = match[1] == "!", match[2]
        return lambda labels: (key in labels) != negate
    if (match := _EQUALS.fullmatch(term)) and _LABEL_VALUE.fullmatch(match[3]):
        key, op, value = match[1], match[2], match[3]
        return lambda labels: (labels.get(key) == value) == (op != "!=")
    if match := _IN.fullmatch(term):
        key, op, values = match[1], match[2], {v.strip() for v in match[3].split(",")}
        if all(_LABEL_VALUE.fullmatch(v) for v in values):
            return lambda labels: (key in labels and labels[key] in values) == (op == "in")
    raise ApiError(400, f"unable to parse requirement: {term!r}", reason="BadRequest")


def _fields_match(obj: Obj, fields: dict[str, str]) -> bool:
    meta = obj["metadata"]
    return all(meta[key.removeprefix("metadata.")] == value for key, value in fields.items())


async def _json_body(request: web.Request, *, expect: type = dict) -> Any:
    try:
        body = await request.json()
    except ValueError as exc:
        raise ApiError(400, f"invalid JSON body: {exc}") from exc
    if not isinstance(body, expect):
        raise ApiError(400, f"expected a JSON {expect.__name__}")
    return body


async def _send(response: web.StreamResponse, etype: str, obj: Obj) -> None:
    await response.write(json.dumps({"type": etype, "object": obj}).encode() + b"\n")


@contextlib.asynccontextmanager
async def run_fake_kube(**kwargs: Any) -> AsyncIterator[FakeKube]:
    """Start a ``FakeKube`` for the duration of the block."""
    fake = FakeKube(**kwargs)
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


@pytest.fixture
async def fake_kube(tmp_path: Path) -> AsyncIterator[FakeKube]:
    """A running fake API server with a kubeconfig at ``fake_kube.kubeconfig``."""
    async with run_fake_kube(bookmark_interval=0.1) as fake:
        fake.write_kubeconfig(tmp_path / "kubeconfig")
        yield fake
