"""List, then watch: follow objects (one by name, or by label selector) through failures.

Modelled on kopf's watching: list, watch from the list's resourceVersion, relist on 410
Gone, reconnect with backoff, and replace a stream that has gone silent. One loop,
``watch_objects``, serves every ``Selector`` of every kind (ConfigMaps, Ingresses,
Services, Secrets); ``watch_configmaps`` gives ConfigMaps' data, and ``watch_configmap``
is its by-name case.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from .client import KubeClient
from .errors import Gone, KubeError, error_from_status_object
from .objects import (
    CLIENT_REQUEST_TIMEOUT,
    DEFAULT_BACKOFF,
    Backoff,
    Selector,
    configmap_object,
    object_key,
)

logger = logging.getLogger(__name__)

Key = tuple[str, str]  # (namespace, name): what identifies an object across events


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """The ConfigMap now exists with ``data`` and ``annotations`` (ADDED, MODIFIED), or does
    not (DELETED). An event may change the annotations alone (a rollout's state)."""

    type: Literal["ADDED", "MODIFIED", "DELETED"]
    namespace: str
    name: str
    data: Mapping[str, str]  # empty for DELETED
    annotations: Mapping[str, str]  # empty for DELETED
    created: str  # metadata.creationTimestamp (RFC 3339, UTC); empty for DELETED
    resource_version: str


Batch = tuple[WatchEvent, ...]
WatchState = Literal["listed", "watching", "relisting", "retrying"]


@dataclass(frozen=True, slots=True)
class WatchStatus:
    """What the watch loop is doing, passed to its ``on_status`` callback at each step.

    Its consumers, the ConfigMap sources, log a warning on ``retrying`` (the API is
    unavailable; the last good config keeps serving), and the tests wait on it. Nothing
    turns it into a metric or into readiness.
    """

    state: WatchState
    resource_version: str | None = None
    error: KubeError | None = None  # why it is relisting or retrying
    delay: float = 0.0  # seconds until the retry


@dataclass(frozen=True, slots=True)
class ObjectEvent:
    """Any object now exists as ``obj`` (ADDED, MODIFIED), or does not (DELETED, with the
    last state it was seen in)."""

    type: Literal["ADDED", "MODIFIED", "DELETED"]
    namespace: str
    name: str
    obj: Mapping[str, Any]
    resource_version: str

    @property
    def key(self) -> Key:
        return (self.namespace, self.name)


ObjectBatch = tuple[ObjectEvent, ...]


class _Seen:
    """What the consumer was last told, per object, so that a relist yields only real
    changes, and reports as DELETED the objects that vanished meanwhile."""

    def __init__(self, expected: Iterable[Key] = ()) -> None:
        self._versions: dict[Key, str] = {}  # object -> the resourceVersion last yielded
        # Reported DELETED if the first list lacks them: a by-name watch always says
        # whether its object exists.
        self._expected = set(expected)

    def present(self, obj: Mapping[str, Any]) -> ObjectEvent | None:
        key = object_key(obj)
        version = _resource_version(obj)
        old = self._versions.get(key)
        if old == version:
            return None
        self._versions[key] = version
        return ObjectEvent("ADDED" if old is None else "MODIFIED", *key, obj, version)

    def absent(
        self, key: Key, resource_version: str, obj: Mapping[str, Any] | None = None
    ) -> ObjectEvent | None:
        if self._versions.pop(key, None) is None and key not in self._expected:
            return None
        return ObjectEvent("DELETED", *key, obj or {}, resource_version)

    def listed(self, objects: Sequence[Mapping[str, Any]], resource_version: str) -> ObjectBatch:
        """The differences between a list and what was last yielded."""
        found = [event for obj in objects if (event := self.present(obj))]
        listed = {object_key(obj) for obj in objects}
        gone = sorted((self._versions.keys() | self._expected) - listed)
        found += [event for key in gone if (event := self.absent(key, resource_version))]
        self._expected.clear()
        return tuple(found)


class OutageLog:
    """``on_status`` for a config source: warn once when the API becomes unavailable, not on
    each retry (the watch loop logs those), saying what keeps serving; and say when it
    answers again."""

    def __init__(self, what: str, *, keeping: str = "the last good config") -> None:
        self.what = what
        self.keeping = keeping
        self.down = False

    def __call__(self, status: WatchStatus) -> None:
        if status.state == "retrying" and not self.down:
            self.down = True
            logger.warning(
                "Kubernetes API unavailable for %s; keeping %s",
                self.what,
                self.keeping,
                extra={"error": str(status.error)},
            )
        elif status.state in ("listed", "watching") and self.down:
            self.down = False
            logger.info("Kubernetes API available again for %s", self.what)


async def watch_objects(
    client: KubeClient,
    selector: Selector,
    *,
    timeout_seconds: int = 240,
    idle_slack: float = 30.0,
    backoff: Backoff = DEFAULT_BACKOFF,
    on_status: Callable[[WatchStatus], None] | None = None,
) -> AsyncGenerator[ObjectBatch, None]:
    """Follow the objects ``selector`` picks, forever: only cancellation (or closing the
    generator, e.g. with ``contextlib.aclosing``) ends it. Yields batches of events; after
    each one, the consumer's picture (ADDED and MODIFIED set an object, DELETED drops it)
    is the server's at some resourceVersion.

    - The first list is always yielded, even empty: every object found, as ADDED.
    - Every change to an object is a batch of one. An object whose labels stop matching
      arrives as DELETED (the server sends it so).
    - Each watch asks the server to end it after ``timeout_seconds`` -- below the client's
      own 300 s total per request -- and the next one resumes from the last resourceVersion
      seen, from an event or a bookmark, so nothing is missed and nothing repeats.
    - 410 Gone/Expired, as an HTTP status or an in-stream ERROR event: list again, and
      yield what differs from what was last yielded (DELETED for objects gone meanwhile),
      if anything does.
    - Dropped connections, timeouts, 429, 5xx and any other API error: retry after
      exponential backoff with jitter (a Retry-After is a floor). Nothing is yielded until
      the API answers again, so an outage never looks like an empty list.
    - A stream silent (no event, no bookmark) for ``timeout_seconds + idle_slack`` is
      presumed dead and replaced.
    """
    if not 1 <= timeout_seconds < CLIENT_REQUEST_TIMEOUT or idle_slack <= 0:
        raise ValueError(f"need 1 <= timeout_seconds < {CLIENT_REQUEST_TIMEOUT:g} and slack > 0")
    report = on_status or (lambda status: None)
    seen = _Seen([(selector.namespace, selector.name)] if selector.namespace and selector.name else [])
    since: str | None = None  # the resourceVersion to watch from; None: list first
    first = True
    failures = 0
    while True:
        try:
            if since is None:
                objects, since = await client.list_objects(selector)
                report(WatchStatus("listed", since))
                if (batch := seen.listed(objects, since)) or first:
                    first = False
                    yield batch
            stream = await client.open_watch(
                selector,
                resource_version=since,
                timeout_seconds=timeout_seconds,
                idle_timeout=timeout_seconds + idle_slack,
            )
            try:
                report(WatchStatus("watching", since))
                while item := await stream.next():
                    event = _on_watch_event(seen, selector, *item)  # raises for an ERROR event
                    failures = 0  # only a working stream resets the backoff
                    since = _resource_version(item[1]) or since
                    if event:
                        yield (event,)
            finally:
                stream.close()
        except Gone as exc:
            # Relist at once -- unless the last attempt failed too: then back off, so a
            # server that keeps answering 410 is not hammered with lists.
            delay = backoff.delay(failures - 1) if failures else 0.0
            failures += 1
            logger.info("%s: %s; relisting in %.2fs", selector, exc, delay)
            report(WatchStatus("relisting", since, exc, delay))
            since = None
            await asyncio.sleep(delay)
        except KubeError as exc:
            delay = backoff.delay(failures, retry_after=exc.retry_after)
            failures += 1
            logger.warning("%s: %s; retry %d in %.2fs", selector, exc, failures, delay)
            report(WatchStatus("retrying", since, exc, delay))
            await asyncio.sleep(delay)


async def watch_configmaps(
    client: KubeClient,
    selector: Selector,
    *,
    timeout_seconds: int = 240,
    idle_slack: float = 30.0,
    backoff: Backoff = DEFAULT_BACKOFF,
    on_status: Callable[[WatchStatus], None] | None = None,
) -> AsyncGenerator[Batch, None]:
    """``watch_objects`` for ConfigMaps, each event with the ConfigMap's ``data`` and
    annotations. Every change is yielded, including one to the annotations alone (a
    rollout's state): consumers that follow only ``data`` compare it themselves."""
    batches = watch_objects(
        client,
        selector,
        timeout_seconds=timeout_seconds,
        idle_slack=idle_slack,
        backoff=backoff,
        on_status=on_status,
    )
    async with contextlib.aclosing(batches):
        async for batch in batches:
            yield tuple(_configmap_event(event) for event in batch)


def _configmap_event(event: ObjectEvent) -> WatchEvent:
    if event.type == "DELETED":
        return WatchEvent("DELETED", event.namespace, event.name, {}, {}, "", event.resource_version)
    return WatchEvent(event.type, *configmap_object(event.obj))


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
    """Follow one ConfigMap's raw ``data`` and annotations, forever: ``watch_configmaps``
    for one name, its batches taken apart. The first event says what the list found:
    ADDED (with data) or DELETED (absent)."""
    batches = watch_configmaps(
        client,
        Selector(namespace, name=name),
        timeout_seconds=timeout_seconds,
        idle_slack=idle_slack,
        backoff=backoff,
        on_status=on_status,
    )
    async with contextlib.aclosing(batches):
        async for batch in batches:
            for event in batch:
                yield event


def _on_watch_event(seen: _Seen, selector: Selector, kind: str, obj: dict[str, Any]) -> ObjectEvent | None:
    """Apply one watch event to ``seen``: what to yield, if anything. Raises for ERROR."""
    if kind == "ERROR":
        raise error_from_status_object(obj)
    if kind not in ("ADDED", "MODIFIED", "DELETED"):
        return None  # BOOKMARK: its resourceVersion is already taken
    key = object_key(obj)
    if not selector.matches(*key):
        return None  # not ours
    if kind == "DELETED":
        return seen.absent(key, _resource_version(obj), obj)
    return seen.present(obj)


def _resource_version(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("resourceVersion") or "")
