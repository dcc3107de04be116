"""KubeClient: the few API calls canary-proxy makes, each with retries; read-modify-write."""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, NamedTuple, Self, TypeVar

import aiohttp  # the client is built on it; the proxy already depends on it

from .config import KubeConfig
from .errors import Conflict, KubeError, Unreachable, error_from_status, translate

if TYPE_CHECKING:
    from kubernetes.aio.client import ApiClient, CoreV1Api, V1ConfigMap

logger = logging.getLogger(__name__)

T = TypeVar("T")
Data = dict[str, str]

# The kubernetes client's own total timeout for one request (its rest.py uses 5 * 60 s).
# A watch asks the server to end the stream before this, so a quiet watch ends cleanly
# rather than as a client-side timeout error.
CLIENT_REQUEST_TIMEOUT = 300.0
_MERGE_PATCH = "application/merge-patch+json"


# -- backoff ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with jitter: attempt n waits about ``base * 2**n``, at most ``cap``.

    The jitter ("equal jitter": half fixed, half random) keeps many proxies from
    reconnecting in lockstep after an API server restart, and never waits zero.
    """

    base: float = 0.5  # a blip (API server rollout, leader change) heals in about a second
    cap: float = 30.0  # retry at least twice a minute, yet never hammer a struggling server

    def __post_init__(self) -> None:
        if not 0 < self.base <= self.cap:
            raise ValueError(f"need 0 < base <= cap, got base={self.base} cap={self.cap}")

    def delay(self, attempt: int, *, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number ``attempt`` (0-based); Retry-After is a floor."""
        ceiling = min(self.cap, self.base * 2 ** min(attempt, 32))
        return max(random.uniform(ceiling / 2, ceiling), retry_after or 0.0)


DEFAULT_BACKOFF = Backoff()


# -- the client --------------------------------------------------------------------------------


# The collections canary-proxy lists and watches: plural -> (API class, its list methods
# for all namespaces and for one, without "_without_preload_content").
_COLLECTIONS: Final = {
    "configmaps": ("CoreV1Api", "list_config_map_for_all_namespaces", "list_namespaced_config_map"),
    "services": ("CoreV1Api", "list_service_for_all_namespaces", "list_namespaced_service"),
    "secrets": ("CoreV1Api", "list_secret_for_all_namespaces", "list_namespaced_secret"),
    "ingresses": ("NetworkingV1Api", "list_ingress_for_all_namespaces", "list_namespaced_ingress"),
}


@dataclass(frozen=True, slots=True)
class Selector:
    """Which objects of a kind (ConfigMaps unless said) to list and watch: in one namespace,
    or in all (``None``); one by name, those a label selector matches, or (neither) every one."""

    namespace: str | None
    name: str | None = None  # one object: the field selector metadata.name=NAME
    labels: str = ""  # a label selector, e.g. "canary-proxy.io/route=true"
    resource: str = "configmaps"  # the collection's plural, a key of _COLLECTIONS
    field_selector: str = ""  # more field selectors, e.g. "type=kubernetes.io/tls"

    @property
    def fields(self) -> str:
        named = f"metadata.name={self.name}" if self.name else ""
        return ",".join(filter(None, (named, self.field_selector)))

    def matches(self, namespace: str, name: str) -> bool:
        """What the server filters already, checked again: labels are left to the server."""
        return self.namespace in (None, namespace) and self.name in (None, name)

    def __str__(self) -> str:  # for log lines and errors
        kind = self.resource.removesuffix("es" if self.resource.endswith("sses") else "s")
        if self.name and self.namespace:
            return f"{kind} {self.namespace}/{self.name}"
        what = f"{kind} {self.name}" if self.name else f"{self.resource} {self.labels or '(any labels)'}"
        return what + (f" in {self.namespace}" if self.namespace else " in all namespaces")


class ConfigMapObject(NamedTuple):
    """A ConfigMap as a list or a watch event shows it."""

    namespace: str
    name: str
    data: Data
    annotations: Data
    created: str  # metadata.creationTimestamp as sent: RFC 3339 in UTC, whole seconds
    resource_version: str


def object_key(obj: Mapping[str, Any]) -> tuple[str, str]:
    """(namespace, name) of an object's JSON; KubeError if it lacks its identity."""
    meta = obj.get("metadata") or {}
    namespace, name, version = (str(meta.get(k) or "") for k in ("namespace", "name", "resourceVersion"))
    if not (namespace and name and version):
        raise KubeError(f"the API server sent an object without namespace, name or resourceVersion: {meta}")
    return namespace, name


def configmap_object(obj: Mapping[str, Any]) -> ConfigMapObject:
    """A ConfigMap's JSON -> ``ConfigMapObject``; KubeError if it lacks its identity."""
    meta = obj.get("metadata") or {}
    namespace, name, version = (str(meta.get(k) or "") for k in ("namespace", "name", "resourceVersion"))
    if not (namespace and name and version):
        raise KubeError(f"the API server sent a ConfigMap without namespace, name or resourceVersion: {meta}")
    return ConfigMapObject(
        namespace,
        name,
        {str(k): str(v) for k, v in (obj.get("data") or {}).items()},
        {str(k): str(v) for k, v in (meta.get("annotations") or {}).items()},
        str(meta.get("creationTimestamp") or ""),
        version,
    )


class WatchStream:
    """One open watch response, read one JSON event per line."""

    def __init__(self, response: aiohttp.ClientResponse, idle_timeout: float) -> None:
        self._response = response
        self._idle_timeout = idle_timeout

    async def next(self) -> tuple[str, dict[str, Any]] | None:
        """The next (type, object); None once the server ended the stream."""
        try:
            async with asyncio.timeout(self._idle_timeout):
                line = await self._response.content.readline()
        except TimeoutError as exc:
            # A half-open connection never errors; silence is the only symptom.
            message = f"no event or bookmark for {self._idle_timeout:g}s; presumed dead"
            raise Unreachable(message) from exc
        except aiohttp.ClientError as exc:
            raise Unreachable(f"watch stream broke: {type(exc).__name__}: {exc}") from exc
        if not line:
            return None
        try:
            event = json.loads(line)
            return str(event["type"]), dict(event["object"])
        except (ValueError, KeyError, TypeError) as exc:
            raise KubeError(f"malformed watch event: {line[:200]!r}") from exc

    def close(self) -> None:
        self._response.close()  # mid-stream, a connection cannot go back to the pool


class ConfigMapState(NamedTuple):
    data: Data
    annotations: Data
    resource_version: str


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
        api = self._apis.get(api_name)
        if api is None:
            from kubernetes.aio import client

            api = self._apis[api_name] = getattr(client, api_name)(self._api)
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
