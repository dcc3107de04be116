"""KubeClient: the few API calls canary-proxy makes, each with retries; read-modify-write."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeVar

import aiohttp  # the client is built on it; the proxy already depends on it

from .config import KubeConfig
from .errors import Conflict, KubeError, Unreachable, error_from_status, translate
from .objects import (
    _COLLECTIONS,
    CLIENT_REQUEST_TIMEOUT,
    DEFAULT_BACKOFF,
    Backoff,
    ConfigMapObject,
    ConfigMapState,
    Data,
    Selector,
    WatchStream,
    configmap_object,
    object_key,
)

if TYPE_CHECKING:
    from kubernetes.aio.client import ApiClient, CoreV1Api, V1ConfigMap

logger = logging.getLogger(__name__)

T = TypeVar("T")
_MERGE_PATCH = "application/merge-patch+json"


class KubeClient:
    """An open connection to the API server, offering the few calls canary-proxy makes.

    Each call retries connection failures, 429 and 5xx ``retries`` times with backoff,
    then raises ``Unreachable``. Writes are retried too: each carries a resourceVersion
    precondition, so re-sending a write that did land gets a 409 rather than a second write.
    """

    def __init__(
        self,
        config: KubeConfig,
        *,
        retries: int = 3,
        backoff: Backoff = DEFAULT_BACKOFF,
        request_timeout: float = 30.0,  # a hung API server must not hang the CLI for 5 min
    ) -> None:
        self.config = config
        self._retries = retries
        self._backoff = backoff
        self._request_timeout = float(request_timeout)
        self._api: ApiClient | None = None
        self._core_api: CoreV1Api | None = None
        self._apis: dict[str, Any] = {}  # API class name -> its instance, made when first used

    @property
    def namespace(self) -> str:
        """The namespace a bare NAME refers to."""
        return self.config.namespace

    async def __aenter__(self) -> Self:
        from kubernetes.aio.client import ApiClient, CoreV1Api

        self._api = ApiClient(self.config.configuration)
        self._core_api = CoreV1Api(self._api)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._api is not None:
            await self._api.close()  # type: ignore[no-untyped-call]
        self._api = self._core_api = None
        self._apis.clear()

    @property
    def _core(self) -> CoreV1Api:
        if self._core_api is None:
            raise RuntimeError("KubeClient used outside 'async with'")
        return self._core_api

    async def get_configmap(self, namespace: str, name: str) -> ConfigMapState:
        """The ConfigMap's data, annotations and resourceVersion; NotFound if absent."""
        cm = await self._call(
            f"get configmap {namespace}/{name}",
            lambda: self._core.read_namespaced_config_map(
                name, namespace, _request_timeout=self._request_timeout
            ),
        )
        return _state_of(cm)

    async def patch_configmap(
        self,
        namespace: str,
        name: str,
        *,
        data: Mapping[str, str | None] | None = None,
        annotations: Mapping[str, str | None] | None = None,
        resource_version: str,
    ) -> ConfigMapState:
        """Merge keys into data/annotations (None deletes a key) -- only if the object is
        still at ``resource_version``; otherwise Conflict, so no concurrent write is lost.

        A JSON merge patch, not a strategic one: it needs no schema on the server side, and
        ``null`` deleting a key is exactly the semantics we want.
        """
        body: dict[str, Any] = {"metadata": {"resourceVersion": resource_version}}
        if annotations:
            body["metadata"]["annotations"] = dict(annotations)
        if data:
            body["data"] = dict(data)
        cm = await self._call(
            f"patch configmap {namespace}/{name}",
            lambda: self._core.patch_namespaced_config_map(
                name,
                namespace,
                body,
                _content_type=_MERGE_PATCH,
                _request_timeout=self._request_timeout,
            ),
        )
        return _state_of(cm)

    async def get_endpoints(
        self, namespace: str, name: str, *, port: str | int | None = None
    ) -> list[tuple[str, int]]:
        """A Service's ready endpoints as sorted (ip, port) pairs; ``port`` picks one port
        by name or number when the Service has several."""
        endpoints = await self._call(
            f"get endpoints {namespace}/{name}",
            lambda: self._core.read_namespaced_endpoints(
                name, namespace, _request_timeout=self._request_timeout
            ),
        )
        found: set[tuple[str, int]] = set()
        for subset in endpoints.subsets or []:
            ports = [p.port for p in subset.ports or [] if port in (None, p.name, p.port)]
            found.update((a.ip, p) for a in subset.addresses or [] for p in ports)
        return sorted(found)

    async def create_event(
        self,
        namespace: str,
        *,
        kind: str,
        name: str,
        reason: str,
        message: str,
        warning: bool = False,
        component: str = "canary-proxy",
    ) -> None:
        """Record a core/v1 Event about an object, as ``kubectl describe`` shows them."""
        from kubernetes.aio import client

        now = datetime.now(UTC).replace(microsecond=0)  # the API's Time has 1 s precision
        event = client.CoreV1Event(
            metadata=client.V1ObjectMeta(generate_name=f"{name}."),
            involved_object=client.V1ObjectReference(kind=kind, name=name, namespace=namespace),
            reason=reason,
            message=message,
            type="Warning" if warning else "Normal",
            source=client.V1EventSource(component=component),
            first_timestamp=now,
            last_timestamp=now,
            count=1,
        )
        await self._call(
            f"create event for {kind} {namespace}/{name}",
            lambda: self._core.create_namespaced_event(
                namespace, event, _request_timeout=self._request_timeout
            ),
        )

    async def list_configmaps(self, selector: Selector) -> tuple[list[ConfigMapObject], str]:
        """The ConfigMaps ``selector`` picks, and the list's resourceVersion, to watch from."""
        items, version = await self.list_objects(selector)
        return [configmap_object(item) for item in items], version

    async def list_objects(self, selector: Selector) -> tuple[list[dict[str, Any]], str]:
        """The objects ``selector`` picks, as JSON, and the list's resourceVersion.

        Read as raw JSON, like the watch's events, so both give the same objects.
        No retries here: the watch loop owns retrying.
        """

        async def fetch() -> bytes:
            response = await self._collection(selector)
            try:
                return await response.read()
            finally:
                response.release()

        body = await self._call(f"list {selector}", fetch, retries=0)
        try:
            listed = json.loads(body)
            version = str(listed["metadata"]["resourceVersion"])
            items = [dict(item) for item in listed.get("items") or []]
            keys = [object_key(item) for item in items]
        except (ValueError, KeyError, TypeError) as exc:
            raise KubeError(f"malformed list of {selector}: {exc!r}") from exc
        if not version:
            raise KubeError("the API server returned a list without a resourceVersion")
        return [item for item, key in zip(items, keys, strict=True) if selector.matches(*key)], version

    async def open_watch(
        self, selector: Selector, *, resource_version: str, timeout_seconds: int, idle_timeout: float
    ) -> WatchStream:
        """Start a watch of what ``selector`` picks, from ``resource_version``."""
        response = await self._call(
            f"watch {selector}",
            lambda: self._collection(
                selector,
                watch=True,
                allow_watch_bookmarks=True,  # bookmarks keep our resourceVersion fresh
                resource_version=resource_version,
                timeout_seconds=timeout_seconds,
                _request_timeout=CLIENT_REQUEST_TIMEOUT,
            ),
            retries=0,
        )
        return WatchStream(response, idle_timeout)

    async def _collection(self, selector: Selector, **params: Any) -> aiohttp.ClientResponse:
        """GET a collection (one namespace's, or all of them) for a list or a watch: the
        raw response if 200, else the error its ``Status`` body describes."""
        params = {
            "field_selector": selector.fields or None,
            "label_selector": selector.labels or None,
            "_request_timeout": self._request_timeout,
        } | params
        api_name, all_namespaces, namespaced = _COLLECTIONS[selector.resource]
        api = self._api_of(api_name)
        response: aiohttp.ClientResponse
        if selector.namespace is None:
            response = await getattr(api, all_namespaces + "_without_preload_content")(**params)
        else:
            response = await getattr(api, namespaced + "_without_preload_content")(
                selector.namespace, **params
            )
        if response.status == 200:
            return response
        try:
            body = await response.read()
        finally:
            response.close()
        raise error_from_status(response.status, body, response.headers)

    def _api_of(self, name: str) -> Any:
        """The client's API class ``name`` (e.g. "NetworkingV1Api"), made when first used."""
        if self._api is None:
            raise RuntimeError("KubeClient used outside 'async with'")
        api = self._apis.get(name)
        if api is None:
            from kubernetes.aio import client

            api = self._apis[name] = getattr(client, name)(self._api)
        return api

    # -- raw JSON objects: Leases and Ingress status ----------------------------------------
    #
    # Read and written as JSON, as the watches see objects: the leader election compares a
    # Lease as the server sent it, and an Ingress status is written back over the object the
    # watch delivered. Bodies go through the client's models (its methods validate them).

    async def get_lease(self, namespace: str, name: str) -> dict[str, Any]:
        """A Lease's JSON; NotFound if absent. No retries: the elector retries on its clock."""
        return await self._json(
            f"get lease {namespace}/{name}",
            lambda: self._api_of("CoordinationV1Api").read_namespaced_lease_without_preload_content(
                name, namespace, _request_timeout=self._request_timeout
            ),
            retries=0,
        )

    async def create_lease(self, namespace: str, lease: Mapping[str, Any]) -> dict[str, Any]:
        """Create a Lease from its JSON; Conflict if one of that name exists already."""
        from kubernetes.aio.client import V1Lease

        return await self._json(
            f"create lease {namespace}/{lease['metadata']['name']}",
            lambda: self._api_of("CoordinationV1Api").create_namespaced_lease_without_preload_content(
                namespace, V1Lease.from_dict(dict(lease)), _request_timeout=self._request_timeout
            ),
            retries=0,
        )

    async def replace_lease(self, namespace: str, lease: Mapping[str, Any]) -> dict[str, Any]:
        """Replace a Lease with its JSON, which carries the resourceVersion it was read at:
        Conflict if it changed since (another candidate wrote first)."""
        from kubernetes.aio.client import V1Lease

        name = lease["metadata"]["name"]
        return await self._json(
            f"update lease {namespace}/{name}",
            lambda: self._api_of("CoordinationV1Api").replace_namespaced_lease_without_preload_content(
                name, namespace, V1Lease.from_dict(dict(lease)), _request_timeout=self._request_timeout
            ),
            retries=0,
        )

    async def get_ingress(self, namespace: str, name: str) -> dict[str, Any]:
        """An Ingress's JSON; NotFound if absent."""
        return await self._json(
            f"get ingress {namespace}/{name}",
            lambda: self._api_of("NetworkingV1Api").read_namespaced_ingress_without_preload_content(
                name, namespace, _request_timeout=self._request_timeout
            ),
        )

    async def replace_ingress_status(self, ingress: Mapping[str, Any]) -> dict[str, Any]:
        """Write an Ingress's ``status`` (its /status subresource: nothing else changes),
        only if the object is still at the resourceVersion it carries; else Conflict.

        An update, not a patch: RBAC grants ``update`` on ingresses/status, as for
        ingress-nginx, and the precondition makes "compare, then write" one step.
        """
        from kubernetes.aio.client import V1Ingress

        meta = ingress["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        return await self._json(
            f"update ingress {namespace}/{name} status",
            lambda: self._api_of("NetworkingV1Api").replace_namespaced_ingress_status_without_preload_content(
                name, namespace, V1Ingress.from_dict(dict(ingress)), _request_timeout=self._request_timeout
            ),
        )

    async def _json(
        self, what: str, call: Callable[[], Awaitable[aiohttp.ClientResponse]], *, retries: int | None = None
    ) -> dict[str, Any]:
        """``_call`` for a method ``_without_preload_content``: the object's JSON if 2xx,
        else the error its ``Status`` body describes."""

        async def fetch() -> bytes:
            response = await call()
            try:
                body = await response.read()
            finally:
                response.release()
            if not 200 <= response.status < 300:
                raise error_from_status(response.status, body, response.headers)
            return body

        body = await self._call(what, fetch, retries=retries)
        try:
            obj = json.loads(body)
        except ValueError as exc:
            raise KubeError(f"{what}: malformed JSON in the answer: {body[:200]!r}") from exc
        if not isinstance(obj, dict):
            raise KubeError(f"{what}: expected an object, got {body[:200]!r}")
        return obj

    async def _call(self, what: str, call: Callable[[], Awaitable[T]], *, retries: int | None = None) -> T:
        """Run one API call, mapping errors to ours and retrying ``Unreachable`` ones."""
        retries = self._retries if retries is None else retries
        attempt = 0
        while True:
            try:
                return await call()
            except Exception as exc:
                error = translate(exc)
                if error is None:
                    raise
                if not isinstance(error, Unreachable) or attempt >= retries:
                    raise error from exc
            delay = self._backoff.delay(attempt, retry_after=error.retry_after)
            attempt += 1
            logger.warning("%s failed (%s); retry %d/%d in %.2fs", what, error, attempt, retries, delay)
            await asyncio.sleep(delay)


def _state_of(cm: V1ConfigMap) -> ConfigMapState:
    meta = cm.metadata
    if meta is None or not meta.resource_version:
        raise KubeError("the API server returned a ConfigMap without a resourceVersion")
    return ConfigMapState(dict(cm.data or {}), dict(meta.annotations or {}), meta.resource_version)


# -- read-modify-write ---------------------------------------------------------------------------

Mutate = Callable[[Data, Data], tuple[Data, Data]]


async def update_configmap(
    client: KubeClient, namespace: str, name: str, mutate: Mutate, *, retries: int = 5
) -> ConfigMapState:
    """Read, ``mutate(data, annotations) -> (data, annotations)``, write with the read
    resourceVersion; on 409 Conflict read again and re-apply, so two writers never silently
    overwrite each other. ``mutate`` gets fresh copies and may be called several times.

    If a write whose answer was lost did land (the retry then gets a 409), the re-read
    shows exactly what we meant to write, and we stop rather than apply ``mutate`` twice.
    """
    meant: tuple[Data, Data] | None = None
    for attempt in range(retries + 1):
        current = await client.get_configmap(namespace, name)
        if meant == (current.data, current.annotations):
            return current
        meant = mutate(dict(current.data), dict(current.annotations))
        if meant == (current.data, current.annotations):
            return current  # nothing to change: no write, no new resourceVersion
        try:
            return await client.patch_configmap(
                namespace,
                name,
                data=_changes(current.data, meant[0]),
                annotations=_changes(current.annotations, meant[1]),
                resource_version=current.resource_version,
            )
        except Conflict:
            logger.info(
                "configmap %s/%s changed after we read resourceVersion %s; re-reading (%d/%d)",
                namespace,
                name,
                current.resource_version,
                attempt + 1,
                retries,
            )
    raise Conflict(f"configmap {namespace}/{name}: still conflicting after {retries} retries")


def _changes(old: Data, new: Data) -> dict[str, str | None]:
    """The merge patch from ``old`` to ``new``: changed keys, and None for removed ones."""
    patch: dict[str, str | None] = {k: v for k, v in new.items() if old.get(k) != v}
    patch.update({k: None for k in old.keys() - new.keys()})
    return patch
