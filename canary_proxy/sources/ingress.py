"""Config from Ingress objects (Ingress mode): the Ingresses of one class and the Services
they name, followed through the API and turned into routes.

Two list+watch loops run side by side on one client, through the same code as the
ConfigMap sources (``k8s.watch_objects``: relist on 410, backoff, dead-stream detection):
one over Ingresses, one over Services, in one namespace or all of them. Every batch of
changes that arrives together is applied before the routes are rebuilt, once, by the pure
``ingress.routes_from_ingresses``; a change that alters no route yields nothing. Nothing is
yielded before both first lists have arrived, so a route is never built without its Service.

What the translation reports (a second canary, an orphan canary, a missing Service) and
the annotations it ignores are logged once each and shown in ``/config`` under
``ingress``. Listeners (TLS, status) are told which Ingresses are claimed whenever that
changes, and ``tasks`` run beside the watches on the same client.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any

from ..ingress import (
    DEFAULT_CLASS,
    IngressRoute,
    IngressRoutes,
    RouteMemo,
    claims,
    routes_from_ingresses,
)
from ..ingress_annotations import DEFAULT_PREFIX
from ..routes import Origin
from .raw import RawConfig, RawRoute

if TYPE_CHECKING:
    from ..k8s import Backoff, KubeClient, ObjectBatch

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (namespace, name)
Obj = Mapping[str, Any]
WATCHED = ("ingresses", "services")


def origin_of(found: IngressRoute) -> Origin:
    return Origin(
        namespace=found.namespace,
        ingress=found.ingress,
        service=found.service,
        host=found.host,
        path=found.path,
        canary=found.canary_label,
        body_limit=found.body_limit,
        ssl_redirect=found.ssl_redirect,
    )


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def raw_from_ingress_routes(result: IngressRoutes, *, ingress_class: str) -> RawConfig:
    """The translation's routes as one source version, with what it reported as notes."""
    routes = []
    for found in result.routes:
        origin = origin_of(found)
        digest = _digest([found.data, origin.to_wire()])
        routes.append(RawRoute(found.route.name, found.route.order, digest, dict(found.data), origin=origin))
    notes = {
        "ingress": {
            "class": ingress_class,
            "reported": [
                {"kind": r.kind, "ingress": r.ingress, "message": r.message} for r in result.reported
            ],
            "ignored": [
                {"ingress": i.ingress, "annotation": i.annotation, "reason": i.reason} for i in result.ignored
            ],
        }
    }
    digest = _digest([[r.name, list(r.order), r.digest] for r in routes] + [notes])
    return RawConfig(digest, None, routes=tuple(routes), notes=notes)


class IngressSource:
    """Follows the Ingresses of ``ingress_class`` and their Services; see the module doc."""

    def __init__(
        self,
        *,
        kubeconfig: str | None,
        namespace: str | None,
        ingress_class: str = DEFAULT_CLASS,
        annotation_prefix: str = DEFAULT_PREFIX,
        backoff: Backoff | None = None,
    ) -> None:
        self.kubeconfig = kubeconfig
        self.namespace = namespace  # None: every namespace
        self.ingress_class = ingress_class
        self.annotation_prefix = annotation_prefix
        self.backoff = backoff
        # Called with the claimed Ingresses (by namespace/name) whenever one changes.
        self.on_claimed_ingresses: list[Callable[[Mapping[Key, Obj]], None]] = []
        # Called with the claimed Ingresses' keys whenever the set changes.
        self.on_claimed: list[Callable[[frozenset[Key]], None]] = []
        # Run beside the watches, on the same client, until the source stops.
        self.tasks: list[Callable[[KubeClient], Coroutine[Any, Any, None]]] = []
        self.objects: dict[str, dict[Key, Obj]] = {resource: {} for resource in WATCHED}
        self._claimed: dict[Key, Obj] = {}
        self._memo = RouteMemo()  # a rebuild after one change parses only what changed
        self._logged: set[tuple[str, ...]] = set()  # what was logged already

    def describe(self) -> str:
        where = f"in {self.namespace}" if self.namespace else "in all namespaces"
        return f"ingresses of class {self.ingress_class} {where}"

    async def follow(self) -> AsyncIterator[RawConfig]:
        """Yield the routes after both first lists, then after each batch of changes that
        changes them, forever (until cancelled). While the API is unreachable nothing is
        yielded: the routes last yielded keep serving."""
        from ..k8s import KubeClient, load_config

        config = await load_config(self.kubeconfig)
        async with KubeClient(config) as client:
            queue: asyncio.Queue[tuple[str, ObjectBatch] | BaseException] = asyncio.Queue()
            running = [asyncio.create_task(self._pump(client, r, queue)) for r in WATCHED]
            running += [asyncio.create_task(task(client)) for task in self.tasks]
            try:
                async for raw in self._changes(queue):
                    yield raw
            finally:
                for task in running:
                    task.cancel()
                await asyncio.gather(*running, return_exceptions=True)

    async def _pump(
        self, client: KubeClient, resource: str, queue: asyncio.Queue[tuple[str, ObjectBatch] | BaseException]
    ) -> None:
        from ..k8s import DEFAULT_BACKOFF, OutageLog, Selector, watch_objects

        selector = Selector(self.namespace, resource=resource)
        batches = watch_objects(
            client,
            selector,
            backoff=self.backoff or DEFAULT_BACKOFF,
            on_status=OutageLog(str(selector), keeping="the last good routes"),
        )
        try:
            async with contextlib.aclosing(batches):
                async for batch in batches:
                    queue.put_nowait((resource, batch))
        except Exception as exc:  # a bug, not an API error (those are retried): surface it
            queue.put_nowait(exc)
            raise

    async def _changes(
        self, queue: asyncio.Queue[tuple[str, ObjectBatch] | BaseException]
    ) -> AsyncIterator[RawConfig]:
        listed: set[str] = set()
        last: RawConfig | None = None
        while True:
            items = [await queue.get()]
            while not queue.empty():  # everything that arrived together is one change
                items.append(queue.get_nowait())
            changed = False
            for item in items:
                if isinstance(item, BaseException):
                    raise item
                resource, batch = item
                listed.add(resource)
                changed |= self._apply(resource, batch)
            if len(listed) < len(WATCHED) or not (changed or last is None):
                continue
            raw = self.snapshot()
            if last is not None and raw.digest == last.digest:
                continue
            last = raw
            yield raw

    def _apply(self, resource: str, batch: ObjectBatch) -> bool:
        """Take in a batch; whether it can change a route (a claimed Ingress, or a Service)."""
        store = self.objects[resource]
        for event in batch:
            if event.type == "DELETED":
                store.pop(event.key, None)
            else:
                store[event.key] = event.obj
        if resource != "ingresses":
            return bool(batch)
        claimed = {key: obj for key, obj in store.items() if claims(obj, self.ingress_class)}
        if claimed == self._claimed:
            return False  # another class's Ingresses
        keys_changed = claimed.keys() != self._claimed.keys()
        self._claimed = claimed
        for listener in self.on_claimed_ingresses:
            listener(dict(claimed))
        if keys_changed:
            for on_keys in self.on_claimed:
                on_keys(frozenset(claimed))
        return True

    def snapshot(self) -> RawConfig:
        """The routes the claimed Ingresses and the Services describe right now."""
        result = routes_from_ingresses(
            self._claimed.values(),
            self.objects["services"].values(),
            ingress_class=self.ingress_class,
            annotation_prefix=self.annotation_prefix,
            parse=self._memo,
        )
        self._memo.sweep()
        self._log_news(result)
        return raw_from_ingress_routes(result, ingress_class=self.ingress_class)

    def _log_news(self, result: IngressRoutes) -> None:
        """Each report and each ignored annotation once, however often the routes rebuild."""
        for report in result.reported:
            if (key := ("report", report.kind, report.ingress, report.message)) not in self._logged:
                self._logged.add(key)
                log.warning("ingress %s: %s", report.ingress, report.message, extra={"kind": report.kind})
        for ignored in result.ignored:
            if (seen := ("ignored", ignored.ingress, ignored.annotation)) not in self._logged:
                self._logged.add(seen)
                log.warning(
                    "ingress %s: annotation %s ignored: %s",
                    ignored.ingress,
                    ignored.annotation,
                    ignored.reason,
                )
