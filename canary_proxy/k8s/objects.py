"""What the client sends and receives: backoff, selectors, objects as the API shows them
(ConfigMaps as data, anything else as its JSON), and one open watch stream. No API calls:
those are ``client.KubeClient``'s."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

import aiohttp  # the client is built on it; the proxy already depends on it

from .errors import KubeError, Unreachable

Data = dict[str, str]

# The kubernetes client's own total timeout for one request (its rest.py uses 5 * 60 s).
# A watch asks the server to end the stream before this, so a quiet watch ends cleanly
# rather than as a client-side timeout error.
CLIENT_REQUEST_TIMEOUT = 300.0


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
