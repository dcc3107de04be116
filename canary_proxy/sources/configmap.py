"""Config from Kubernetes ConfigMaps, followed through the API (list, then watch).

Two sources: one ConfigMap by name (``follow_configmap``: one route), or every ConfigMap a
label selector matches (``follow_configmap_selector``: one route each). The watch loop
itself (relist on 410, backoff, dead-stream detection) lives in ``k8s``; this module turns
its events into the same ``RawConfig`` the file source yields, with the rollout's state
(the ``canary-proxy.io/*`` annotations) alongside. An unreachable API never replaces the
last good config, and a deleted ConfigMap only removes its own route.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from ..annotations import recorded
from .raw import RawConfig, RawRoute

if TYPE_CHECKING:
    from ..k8s import Backoff

log = logging.getLogger(__name__)


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def raw_from_data(data: dict[str, str], annotations: Mapping[str, str] | None = None) -> RawConfig:
    """The digest covers ``data`` only: a change to the annotations alone is the same config."""
    notes = None if annotations is None else recorded(annotations)
    return RawConfig(_digest(data), dict(data), annotations=notes)


def route_from_data(
    ref: str, *, created: str, data: Mapping[str, str], annotations: Mapping[str, str]
) -> RawRoute:
    """The route of ConfigMap ``ref`` ("NAMESPACE/NAME"), in creation order. Its digest, like
    ``raw_from_data``'s, covers ``data`` only."""
    return RawRoute(ref, (created, ref), _digest(dict(data)), dict(data), annotations=recorded(annotations))


def raw_from_routes(routes: Iterable[RawRoute]) -> RawConfig:
    """Routes in creation order. The digest covers each one's name, order and data: a
    ConfigMap deleted and re-created with the same data is newer, and may lose a conflict."""
    ordered = tuple(sorted(routes, key=lambda route: route.order))
    digest = _digest([[route.name, list(route.order), route.digest] for route in ordered])
    return RawConfig(digest, None, routes=ordered)


def _same(a: RawConfig, b: RawConfig) -> bool:
    """The same routes with the same rollout annotations: nothing a consumer would act on."""
    notes = [[route.annotations for route in raw.routes or ()] for raw in (a, b)]
    return a.digest == b.digest and notes[0] == notes[1]


async def follow_configmap(ref: str, *, kubeconfig: str | None) -> AsyncIterator[RawConfig]:
    """Yield the ConfigMap's ``data`` and rollout annotations each time either changes, forever
    (until cancelled). A change to the annotations alone keeps the digest, so the consumer
    (``control.ConfigControl``) updates the rollout it shows without reloading the config."""
    from ..k8s import KubeClient, OutageLog, load_config, parse_ref, watch_configmap

    namespace, name = parse_ref(ref)
    config = await load_config(kubeconfig)
    namespace = namespace or config.namespace

    last: RawConfig | None = None
    async with KubeClient(config) as client:
        on_status = OutageLog(f"configmap {namespace}/{name}")
        events = watch_configmap(client, namespace, name, on_status=on_status)
        async with contextlib.aclosing(events):
            async for event in events:
                if event.type == "DELETED":
                    log.error(
                        "configmap %s/%s does not exist (deleted?); keeping the last good config",
                        namespace,
                        name,
                    )
                    continue
                raw = raw_from_data(dict(event.data), event.annotations)
                if last is not None and (raw.digest, raw.annotations) == (last.digest, last.annotations):
                    continue  # only labels or other tools' annotations changed
                last = raw
                yield raw


async def follow_configmap_selector(
    selector: str, *, namespace: str | None, kubeconfig: str | None, backoff: Backoff | None = None
) -> AsyncIterator[RawConfig]:
    """Yield every ConfigMap the label ``selector`` matches, in ``namespace`` (None: in all),
    as one route each, forever (until cancelled): after the first list, even if it finds
    none, and then after each batch of changes that changes a route's data, its creation
    order or its rollout annotations. ValueError at once for a malformed selector.

    Each route is named NAMESPACE/NAME and ordered by creation, then name. Its data is not
    checked here: ``control.ConfigControl`` validates each route on its own, so a ConfigMap
    without data is a route with empty data, which it rejects alone. While the API is
    unreachable nothing is yielded: the routes last yielded keep serving.
    """
    from ..k8s import (
        DEFAULT_BACKOFF,
        KubeClient,
        OutageLog,
        Selector,
        check_label_selector,
        load_config,
        watch_configmaps,
    )

    where = Selector(namespace, labels=check_label_selector(selector))
    config = await load_config(kubeconfig)
    routes: dict[str, RawRoute] = {}
    last: RawConfig | None = None
    async with KubeClient(config) as client:
        batches = watch_configmaps(
            client, where, backoff=backoff or DEFAULT_BACKOFF, on_status=OutageLog(str(where))
        )
        async with contextlib.aclosing(batches):
            async for batch in batches:
                for event in batch:
                    ref = f"{event.namespace}/{event.name}"
                    if event.type == "DELETED":
                        routes.pop(ref, None)
                    else:
                        routes[ref] = route_from_data(
                            ref, created=event.created, data=event.data, annotations=event.annotations
                        )
                raw = raw_from_routes(routes.values())
                if last is not None and _same(raw, last):
                    continue  # only labels or other tools' annotations changed
                last = raw
                yield raw
