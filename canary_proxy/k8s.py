"""The small Kubernetes API surface canary-proxy uses, with its own error types.

This is the only module that talks to Kubernetes. It imports the ``kubernetes`` client
lazily, inside functions, so the proxy in file mode never pays for it; and callers only
ever see ``KubeError`` and its subclasses, never the client's or aiohttp's exceptions.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import re
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Self, TypeVar

import aiohttp  # the client is built on it; the proxy already depends on it

if TYPE_CHECKING:
    from kubernetes.aio.client import ApiClient, Configuration, CoreV1Api, V1ConfigMap

logger = logging.getLogger(__name__)

T = TypeVar("T")
Data = dict[str, str]

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
# The kubernetes client's own total timeout for one request (its rest.py uses 5 * 60 s).
# A watch asks the server to end the stream before this, so a quiet watch ends cleanly
# rather than as a client-side timeout error.
CLIENT_REQUEST_TIMEOUT = 300.0
_MERGE_PATCH = "application/merge-patch+json"
_NAMESPACE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")  # an RFC 1123 label
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")  # an RFC 1123 subdomain


# -- errors -----------------------------------------------------------------------------


class KubeError(Exception):
    """A failed Kubernetes API call (or client setup). ``status`` is the HTTP status, if any."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        reason: str = "",
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason  # the Status object's reason, e.g. "Expired"
        self.retry_after = retry_after  # seconds the server asked us to wait (429, 503)


class NotFound(KubeError):
    """404: the object does not exist."""


class Conflict(KubeError):
    """409: a write carried a stale resourceVersion, or the object already exists."""


class Gone(KubeError):
    """410: the resourceVersion is too old to watch from; list again."""


class Unreachable(KubeError):
    """No usable answer: connection failure, timeout, 429 or 5xx (after any retries)."""


_BY_STATUS: dict[int, type[KubeError]] = {404: NotFound, 409: Conflict, 410: Gone}


def _error_from_status(
    status: int, body: str | bytes | None, headers: Mapping[str, str] | None = None
) -> KubeError:
    """Our error for an HTTP status and its body, ideally a Kubernetes ``Status`` object."""
    try:
        status_obj = json.loads(body or "{}")
    except ValueError:
        status_obj = None
    if not isinstance(status_obj, dict):
        status_obj = {"message": str(body)[:200]}
    return _error_from_status_object(status_obj, status=status, headers=headers)


def _error_from_status_object(
    obj: Mapping[str, Any], *, status: int | None = None, headers: Mapping[str, str] | None = None
) -> KubeError:
    code = status or int(obj.get("code") or 0)
    reason = str(obj.get("reason") or "")
    retriable = code == 429 or code >= 500
    cls = _BY_STATUS.get(code) or (Unreachable if retriable else KubeError)
    message = f"HTTP {code} {reason}: {obj.get('message', '')}".rstrip(": ")
    return cls(message, status=code, reason=reason, retry_after=_retry_after(headers))


def _retry_after(headers: Mapping[str, str] | None) -> float | None:
    value = (headers or {}).get("Retry-After", "")
    return float(value) if value.isdigit() else None  # the HTTP-date form is not used by k8s


def _translate(exc: BaseException) -> KubeError | None:
    """Map a client or transport exception to ours; None for anything else (a bug)."""
    from kubernetes.aio.client.exceptions import ApiException

    if isinstance(exc, KubeError):
        return exc
    if isinstance(exc, ApiException):
        if not exc.status:  # raised by the client before any request was made
            return KubeError(f"kubernetes client error: {exc.reason}")
        return _error_from_status(exc.status, exc.body, exc.headers)
    if isinstance(exc, aiohttp.ClientError | TimeoutError | OSError):
        return Unreachable(f"{type(exc).__name__}: {exc}")
    return None


# -- references and configuration ----------------------------------------------------------


def parse_ref(ref: str) -> tuple[str | None, str]:
    """``"[NAMESPACE/]NAME"`` -> ``(namespace or None, name)``; ValueError if malformed."""
    namespace, _, name = ref.rpartition("/")
    if "/" in namespace or (_ and not _NAMESPACE.match(namespace)):
        raise ValueError(f"invalid namespace in {ref!r}: expected [NAMESPACE/]NAME")
    if not _NAME.match(name):
        raise ValueError(f"invalid name in {ref!r}: expected a lowercase RFC 1123 name")
    return (namespace or None), name


@dataclass(frozen=True)
class KubeConfig:
    """How to reach the API server, and the namespace a bare NAME refers to."""

    configuration: Configuration  # the client's settings: host, credentials, TLS
    namespace: str
    source: str  # "in-cluster" or the kubeconfig path(s), for log lines


async def load_config(
    kubeconfig: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] = os.environ,
    service_account: Path = SERVICE_ACCOUNT_DIR,
) -> KubeConfig:
    """Load client settings; the first of these that applies wins:

    1. ``kubeconfig`` (the ``--kubeconfig PATH`` flag);
    2. in a pod (``KUBERNETES_SERVICE_HOST`` set, a service-account token mounted): the
       pod's service account;
    3. ``$KUBECONFIG`` (a ``:``-separated list, merged as kubectl merges it);
    4. ``~/.kube/config``.

    The default namespace comes with the credentials: in a pod, the pod's own namespace
    (the service account's ``namespace`` file); from a kubeconfig, its current context's
    namespace; else ``default``.
    """
    in_pod = bool(environ.get("KUBERNETES_SERVICE_HOST")) and (service_account / "token").exists()
    if kubeconfig is None and in_pod:
        return _load_in_cluster(environ, service_account)
    path = os.fspath(kubeconfig or environ.get("KUBECONFIG") or Path.home() / ".kube/config")
    return await _load_kubeconfig(path)


def _load_in_cluster(environ: Mapping[str, str], service_account: Path) -> KubeConfig:
    from kubernetes.aio.client import Configuration
    from kubernetes.aio.config import ConfigException
    from kubernetes.aio.config.incluster_config import InClusterConfigLoader

    configuration = Configuration()
    # The client's config loaders are untyped, hence the ignores on their calls.
    loader = InClusterConfigLoader(  # type: ignore[no-untyped-call]
        token_filename=str(service_account / "token"),
        cert_filename=str(service_account / "ca.crt"),
        environ=environ,  # it re-reads the token file: bound tokens rotate hourly
    )
    try:
        loader.load_and_set(configuration)  # type: ignore[no-untyped-call]
    except ConfigException as exc:
        raise KubeError(f"cannot use the pod's service account: {exc}") from exc
    namespace_file = service_account / "namespace"
    namespace = namespace_file.read_text().strip() if namespace_file.exists() else ""
    return KubeConfig(configuration, namespace or "default", "in-cluster")


async def _load_kubeconfig(path: str) -> KubeConfig:
    from kubernetes.aio.client import Configuration
    from kubernetes.aio.config import ConfigException, load_kube_config

    if not _any_exists(path):
        raise KubeError(f"no kubeconfig at {path}: pass --kubeconfig or set $KUBECONFIG")
    configuration = Configuration()
    try:
        # persist_config=False: never write refreshed tokens back into the user's file.
        loader = await load_kube_config(  # type: ignore[no-untyped-call]
            config_file=path, client_configuration=configuration, persist_config=False
        )
    except (ConfigException, OSError, ValueError, KeyError, TypeError) as exc:
        raise KubeError(f"cannot load kubeconfig {path}: {exc}") from exc
    context = loader.current_context.get("context") or {}
    return KubeConfig(configuration, context.get("namespace") or "default", path)


def _any_exists(paths: str) -> bool:
    return any(os.path.exists(os.path.expanduser(p)) for p in paths.split(os.pathsep) if p)


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

    async def _list_configmap(self, namespace: str, name: str) -> tuple[ConfigMapState | None, str]:
        """The ConfigMap (or None) and the list's resourceVersion, to watch from.

        A list, not a get: only a list's resourceVersion is a point to watch from. No
        retries here; the watch loop owns retrying.
        """
        result = await self._call(
            f"list configmap {namespace}/{name}",
            lambda: self._core.list_namespaced_config_map(
                namespace,
                field_selector=f"metadata.name={name}",
                _request_timeout=self._request_timeout,
            ),
            retries=0,
        )
        if result.metadata is None or not result.metadata.resource_version:
            raise KubeError("the API server returned a list without a resourceVersion")
        items = [_state_of(cm) for cm in result.items if cm.metadata and cm.metadata.name == name]
        return (items[0] if items else None), result.metadata.resource_version

    async def _open_watch(
        self, namespace: str, name: str, *, resource_version: str, timeout_seconds: int
    ) -> aiohttp.ClientResponse:
        """Start a watch of one ConfigMap from ``resource_version``; the raw response."""

        async def open_watch() -> aiohttp.ClientResponse:
            response = await self._core.list_namespaced_config_map_without_preload_content(
                namespace,
                watch=True,
                allow_watch_bookmarks=True,  # bookmarks keep our resourceVersion fresh
                field_selector=f"metadata.name={name}",
                resource_version=resource_version,
                timeout_seconds=timeout_seconds,
                _request_timeout=CLIENT_REQUEST_TIMEOUT,
            )
            if response.status == 200:
                return response
            try:  # an error before the stream: the body is a Status
                body = await response.read()
            finally:
                response.close()
            raise _error_from_status(response.status, body, response.headers)

        return await self._call(f"watch configmap {namespace}/{name}", open_watch, retries=0)

    async def _call(self, what: str, call: Callable[[], Awaitable[T]], *, retries: int | None = None) -> T:
        """Run one API call, mapping errors to ours and retrying ``Unreachable`` ones."""
        retries = self._retries if retries is None else retries
        attempt = 0
        while True:
            try:
                return await call()
            except Exception as exc:
                error = _translate(exc)
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


# -- watch -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """The ConfigMap now exists with ``data`` and ``annotations`` (ADDED, MODIFIED), or does
    not (DELETED). An event may change the annotations alone (a rollout's state)."""

    type: Literal["ADDED", "MODIFIED", "DELETED"]
    data: Mapping[str, str]  # empty for DELETED
    annotations: Mapping[str, str]  # empty for DELETED
    resource_version: str


WatchState = Literal["listed", "watching", "relisting", "retrying"]


@dataclass(frozen=True, slots=True)
class WatchStatus:
    """What ``watch_configmap`` is doing, passed to its ``on_status`` callback at each step.

    Its one consumer, the ConfigMap source's ``follow_configmap``, logs a warning on
    ``retrying`` (the API is unavailable; the last good config keeps serving), and the tests
    wait on it. Nothing turns it into a metric or into readiness.
    """

    state: WatchState
    resource_version: str | None = None
    error: KubeError | None = None  # why it is relisting or retrying
    delay: float = 0.0  # seconds until the retry


class _Seen:
    """What the consumer was last told, so that a relist yields only real changes."""

    def __init__(self) -> None:
        self.exists: bool | None = None  # None: nothing yielded yet
        self.version = ""

    def present(self, data: Data, annotations: Data, resource_version: str) -> WatchEvent | None:
        if self.exists and self.version == resource_version:
            return None
        kind: Literal["ADDED", "MODIFIED"] = "MODIFIED" if self.exists else "ADDED"
        self.exists, self.version = True, resource_version
        return WatchEvent(kind, data, annotations, resource_version)

    def absent(self, resource_version: str) -> WatchEvent | None:
        if self.exists is False:
            return None
        self.exists, self.version = False, resource_version
        return WatchEvent("DELETED", {}, {}, resource_version)

    def listed(self, state: ConfigMapState | None, resource_version: str) -> WatchEvent | None:
        if state is None:
            return self.absent(resource_version)
        return self.present(state.data, state.annotations, state.resource_version)


class _WatchStream:
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


async def watch_configmap(
    client: KubeClient,
    namespace: str,
    name: str,
    *,
    timeout_seconds: int = 240,
    idle_slack: float = 30.0,
    backoff: Backoff = DEFAULT_BACKOFF,
    on_status: Callable[[WatchStatus], None] | None = None,
) -> AsyncGenerator[WatchEvent, None]:
    """Follow one ConfigMap's raw ``data`` and annotations, forever: only cancellation (or
    closing the generator, e.g. with ``contextlib.aclosing``) ends it. Modelled on kopf's
    watching: list, then watch from the list's resourceVersion.

    - The first event says what the list found: ADDED (with data) or DELETED (absent).
    - Every change of the object is yielded, including one to its annotations alone:
      consumers that follow only ``data`` compare it themselves.
    - Each watch asks the server to end it after ``timeout_seconds`` -- below the client's
      own 300 s total per request -- and the next one resumes from the last resourceVersion
      seen, from an event or a bookmark, so nothing is missed and nothing repeats.
    - 410 Gone/Expired, as an HTTP status or an in-stream ERROR event: list again, and yield
      the result only if it differs from what was last yielded.
    - Dropped connections, timeouts, 429, 5xx and any other API error: retry after
      exponential backoff with jitter (a Retry-After is a floor).
    - A stream silent (no event, no bookmark) for ``timeout_seconds + idle_slack`` is
      presumed dead and replaced.
    """
    if not 1 <= timeout_seconds < CLIENT_REQUEST_TIMEOUT or idle_slack <= 0:
        raise ValueError(f"need 1 <= timeout_seconds < {CLIENT_REQUEST_TIMEOUT:g} and slack > 0")
    report = on_status or (lambda status: None)
    seen = _Seen()
    since: str | None = None  # the resourceVersion to watch from; None: list first
    failures = 0
    while True:
        try:
            if since is None:
                state, since = await client._list_configmap(namespace, name)
                report(WatchStatus("listed", since))
                if event := seen.listed(state, since):
                    yield event
            stream = _WatchStream(
                await client._open_watch(
                    namespace, name, resource_version=since, timeout_seconds=timeout_seconds
                ),
                idle_timeout=timeout_seconds + idle_slack,
            )
            try:
                report(WatchStatus("watching", since))
                while item := await stream.next():
                    event = _on_watch_event(seen, name, *item)  # raises for an ERROR event
                    failures = 0  # only a working stream resets the backoff
                    since = _resource_version(item[1]) or since
                    if event:
                        yield event
            finally:
                stream.close()
        except Gone as exc:
            # Relist at once -- unless the last attempt failed too: then back off, so a
            # server that keeps answering 410 is not hammered with lists.
            delay = backoff.delay(failures - 1) if failures else 0.0
            failures += 1
            logger.info("configmap %s/%s: %s; relisting in %.2fs", namespace, name, exc, delay)
            report(WatchStatus("relisting", since, exc, delay))
            since = None
            await asyncio.sleep(delay)
        except KubeError as exc:
            delay = backoff.delay(failures, retry_after=exc.retry_after)
            failures += 1
            logger.warning("configmap %s/%s: %s; retry %d in %.2fs", namespace, name, exc, failures, delay)
            report(WatchStatus("retrying", since, exc, delay))
            await asyncio.sleep(delay)


def _on_watch_event(seen: _Seen, name: str, kind: str, obj: dict[str, Any]) -> WatchEvent | None:
    """Apply one watch event to ``seen``: what to yield, if anything. Raises for ERROR."""
    if kind == "ERROR":
        raise _error_from_status_object(obj)
    version = _resource_version(obj)
    if kind not in ("ADDED", "MODIFIED", "DELETED") or _name(obj) != name:
        return None  # BOOKMARK (its resourceVersion is already taken), or not ours
    if kind == "DELETED":
        return seen.absent(version)
    annotations = (obj.get("metadata") or {}).get("annotations") or {}
    return seen.present(dict(obj.get("data") or {}), dict(annotations), version)


def _resource_version(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("resourceVersion") or "")


def _name(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("name") or "")
