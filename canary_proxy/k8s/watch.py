"""List, then watch: follow a ConfigMap's data and annotations through every failure.

Modelled on kopf's watching: list, watch from the list's resourceVersion, relist on 410
Gone, reconnect with backoff, and replace a stream that has gone silent.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp  # the client is built on it; the proxy already depends on it

from .client import CLIENT_REQUEST_TIMEOUT, DEFAULT_BACKOFF, Backoff, ConfigMapState, Data, KubeClient
from .errors import Gone, KubeError, Unreachable, error_from_status_object

logger = logging.getLogger(__name__)


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
        raise error_from_status_object(obj)
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
