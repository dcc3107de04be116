"""The ADDRESS of claimed Ingresses: ``status.loadBalancer.ingress``, written by the leader.

As ingress-nginx's status sync (``internal/ingress/status``):

- The address comes from ``--publish-address`` (a comma-separated list; an IP becomes
  ``{ip: ...}``, a name ``{hostname: ...}``) or from ``--publish-service NS/NAME``,
  followed live: a LoadBalancer Service gives its ``status.loadBalancer.ingress`` (and
  its ``externalIPs``), a NodePort one its ``externalIPs`` (else its cluster IP), a
  ClusterIP one its cluster IP, an ExternalName one its name. Until that Service exists,
  nothing is written (nothing is cleared either).
- Entries are compared as ingress-nginx compares them: sorted by hostname, then IP; only
  ``ip`` and ``hostname`` count. An Ingress is written only when its list differs, as an
  update of its ``/status`` with the resourceVersion it was seen at (409: read, compare,
  write again).
- Only the leader writes: one ``LeaderElector`` per replica, on the Lease
  ``canary-proxy-leader-CLASS``; every replica serves traffic all the same.

What is written follows two watches, run only while leading: the publish Service, and the
Ingresses in the proxy's scope (their current status, so a write happens only on a real
difference, and a status someone else overwrites is written back). Someone who keeps
overwriting it (another controller claiming the same class) is written back with a
growing per-Ingress backoff, never in a tight loop. Only claimed Ingresses are written;
one that stops being claimed keeps its status for its next controller to replace.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import ipaddress
import logging
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .k8s.client import KubeClient
from .k8s.errors import Conflict, KubeError, NotFound
from .k8s.lease import LeaderElector, LeaseRef, LeaseTiming, default_identity
from .k8s.objects import Backoff, Selector
from .k8s.watch import watch_objects

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (namespace, name) of an Ingress
Entry = tuple[str, str]  # (hostname, ip): one load-balancer ingress point, as compared
Addresses = tuple[Entry, ...]  # sorted: ingress-nginx's lessLoadBalancerIngress order

_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?)*$"
)


# -- the pure part: addresses -------------------------------------------------------------------


def entry(name_or_ip: str) -> Entry:
    """``--publish-address`` item -> an entry: an IP (v4 or v6) or else a DNS name."""
    try:
        return ("", str(ipaddress.ip_address(name_or_ip)))
    except ValueError:
        pass
    if not _HOSTNAME.match(name_or_ip):
        raise ValueError(f"{name_or_ip!r} is neither an IP address nor a DNS name")
    return (name_or_ip.lower(), "")


def parse_publish_address(text: str) -> Addresses:
    """``"203.0.113.7, lb.example.com"`` -> sorted entries; ValueError if one is malformed."""
    items = [item for item in re.split(r",\s*", text.strip()) if item]
    if not items:
        raise ValueError("an IP address or DNS name, or several separated by commas")
    return normalized(entry(item) for item in items)


def normalized(entries: Any) -> Addresses:
    """Entries, deduplicated and in ingress-nginx's order (hostname, then IP)."""
    return tuple(sorted(set(entries)))


def entries_of(points: Sequence[Mapping[str, Any]] | None) -> Addresses:
    """A ``loadBalancer.ingress`` list (of an Ingress or a Service) -> compared entries."""
    return normalized((str(p.get("hostname") or ""), str(p.get("ip") or "")) for p in points or ())


def ingress_addresses(ingress: Mapping[str, Any]) -> Addresses:
    """What an Ingress's ``status.loadBalancer.ingress`` says now."""
    status = ingress.get("status") or {}
    return entries_of((status.get("loadBalancer") or {}).get("ingress"))


def service_addresses(service: Mapping[str, Any]) -> Addresses | None:
    """The addresses a publish Service gives, by its type, as ingress-nginx's
    ``statusAddressFromService``; None for a type that gives none."""
    spec = service.get("spec") or {}
    kind = spec.get("type") or "ClusterIP"
    external_ips = [("", str(ip)) for ip in spec.get("externalIPs") or ()]
    cluster_ip = [("", str(spec["clusterIP"]))] if spec.get("clusterIP") not in (None, "", "None") else []
    if kind == "ExternalName":
        return normalized([(str(spec.get("externalName") or "").lower(), "")])
    if kind == "ClusterIP":
        return normalized(cluster_ip)
    if kind == "NodePort":
        return normalized(external_ips or cluster_ip)
    if kind == "LoadBalancer":
        balancer = entries_of(((service.get("status") or {}).get("loadBalancer") or {}).get("ingress"))
        named = {value for point in balancer for value in point if value}
        return normalized([*balancer, *(e for e in external_ips if e[1] not in named)])
    return None


def with_addresses(ingress: Mapping[str, Any], addresses: Addresses) -> dict[str, Any]:
    """A copy of the Ingress whose ``status.loadBalancer.ingress`` is ``addresses`` (the
    field left out when empty, as the API server stores an empty list)."""
    points = [{k: v for k, v in (("hostname", host), ("ip", ip)) if v} for host, ip in addresses]
    result = copy.deepcopy(dict(ingress))
    status = result.setdefault("status", {}) or {}
    result["status"] = status
    status["loadBalancer"] = {"ingress": points} if points else {}
    return result


def shown(addresses: Addresses | None) -> str:
    """For log lines: ``lb.example.com,203.0.113.7``; ``(none)`` for an empty list."""
    if addresses is None:
        return "(unknown)"
    return ",".join(host or ip for host, ip in addresses) or "(none)"


@dataclass(frozen=True, slots=True)
class PublishAddress:
    """``--publish-address``: fixed entries."""

    addresses: Addresses

    def __str__(self) -> str:
        return shown(self.addresses)


@dataclass(frozen=True, slots=True)
class PublishService:
    """``--publish-service NS/NAME``: the Service's address, followed live."""

    namespace: str
    name: str

    def __str__(self) -> str:
        return f"service {self.namespace}/{self.name}"


Publish = PublishAddress | PublishService


def lease_name(ingress_class: str) -> str:
    """The default ``--election-id``: one election per IngressClass."""
    return f"canary-proxy-leader-{ingress_class}"


# -- the writer ---------------------------------------------------------------------------------


@dataclass(slots=True)
class _Written:
    """What we last wrote to one Ingress, when, and how often we had to write it again."""

    addresses: Addresses
    not_before: float  # monotonic: no rewrite of the same addresses before then
    strikes: int  # rewrites of the same addresses: someone else keeps changing them


DEFAULT_TIMING = LeaseTiming()
REWRITE_BACKOFF = Backoff(base=1.0, cap=300.0)  # a fight with another writer: 1 s, 2 s, ... 5 min


class StatusWriter:
    """Writes the status of the claimed Ingresses while this replica leads the election.

    Plugged into Ingress mode as ``source.on_claimed.append(writer.claimed)`` and
    ``source.tasks.append(writer.run)``: it runs on the source's client for as long as the
    source does, and cancelling it stops writing and releases the Lease.
    """

    def __init__(
        self,
        *,
        publish: Publish,
        lease: LeaseRef,
        namespace: str | None = None,  # the Ingresses' scope, as the Ingress watch's: None is all
        identity: str | None = None,  # default: $HOSTNAME and a random suffix
        timing: LeaseTiming = DEFAULT_TIMING,
        clear_on_shutdown: bool = False,  # --update-status-on-shutdown
        rewrite_backoff: Backoff = REWRITE_BACKOFF,
        watch_backoff: Backoff | None = None,  # the watches' reconnect backoff (tests: short)
    ) -> None:
        self.publish = publish
        self.lease = lease
        self.namespace = namespace
        self.identity = identity or default_identity()
        self.timing = timing
        self.clear_on_shutdown = clear_on_shutdown
        self._rewrite_backoff = rewrite_backoff
        self._watch_options: dict[str, Any] = {"backoff": watch_backoff} if watch_backoff else {}
        self.elector: LeaderElector | None = None  # made by run(), on its client
        self._client: KubeClient  # set by run()
        self._claimed: frozenset[Key] = frozenset()
        self._objects: dict[Key, dict[str, Any]] = {}  # Ingresses in scope, as last seen
        self._listed = False  # the Ingress watch has listed since we became leader
        self._addresses: Addresses | None = None  # what to publish; None: not known yet
        self._written: dict[Key, _Written] = {}
        self._wake = asyncio.Event()
        self.writes = 0  # status updates made (tests and logs)

    @property
    def is_leader(self) -> bool:
        return self.elector is not None and self.elector.is_leader

    def claimed(self, keys: frozenset[Key]) -> None:
        """The Ingresses this proxy serves now, by (namespace, name): an ``on_claimed`` listener."""
        if keys != self._claimed:
            self._claimed = frozenset(keys)
            self._wake.set()

    async def run(self, client: KubeClient) -> None:
        """Campaign, and write statuses while leading, until cancelled (then clear them if
        ``clear_on_shutdown``, and release the Lease)."""
        self._client = client
        self.elector = LeaderElector(client, self.lease, identity=self.identity, timing=self.timing)
        log.info(
            "status: publishing %s on claimed Ingresses while leading lease %s as %s",
            self.publish,
            self.lease,
            self.identity,
        )
        await self.elector.run(self._lead, on_shutdown=self._shutdown if self.clear_on_shutdown else None)

    async def _lead(self) -> None:
        self._objects.clear()
        self._written.clear()
        self._listed = False
        fixed = isinstance(self.publish, PublishAddress)
        self._addresses = self.publish.addresses if isinstance(self.publish, PublishAddress) else None
        async with asyncio.TaskGroup() as tasks:  # a bug in one ends the leadership, logged
            tasks.create_task(self._follow_ingresses())
            if not fixed:
                tasks.create_task(self._follow_service())
            tasks.create_task(self._sync_forever())

    async def _follow_ingresses(self) -> None:
        batches = watch_objects(
            self._client, Selector(self.namespace, resource="ingresses"), **self._watch_options
        )
        async with contextlib.aclosing(batches):
            async for batch in batches:
                for event in batch:
                    if event.type == "DELETED":
                        self._objects.pop(event.key, None)
                        self._written.pop(event.key, None)
                    else:
                        self._objects[event.key] = dict(event.obj)
                self._listed = True
                self._wake.set()

    async def _follow_service(self) -> None:
        assert isinstance(self.publish, PublishService)
        service = self.publish
        selector = Selector(service.namespace, name=service.name, resource="services")
        batches = watch_objects(self._client, selector, **self._watch_options)
        async with contextlib.aclosing(batches):
            async for batch in batches:
                for event in batch:
                    if event.type == "DELETED":
                        log.warning("status: %s does not exist; Ingress status left as it is", service)
                        self._addresses = None
                        continue
                    addresses = service_addresses(event.obj)
                    if addresses is None:
                        kind = (event.obj.get("spec") or {}).get("type")
                        log.warning("status: %s is of type %s, which has no address", service, kind)
                    elif addresses != self._addresses:
                        log.info("status: %s has the address %s", service, shown(addresses))
                    self._addresses = addresses
                self._wake.set()

    async def _sync_forever(self) -> None:
        while True:
            self._wake.clear()
            delay = await self.sync()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()

    async def sync(self) -> float | None:
        """Write every claimed Ingress whose status differs; seconds until a deferred
        rewrite is due (None: nothing deferred)."""
        addresses = self._addresses
        if addresses is None or not self._listed:
            return None
        due: float | None = None
        for key in sorted(self._claimed):
            obj = self._objects.get(key)
            if obj is None or ingress_addresses(obj) == addresses:
                continue
            written = self._written.get(key)
            now = time.monotonic()
            if written is not None and written.addresses == addresses and written.not_before > now:
                wait = written.not_before - now
                due = wait if due is None else min(due, wait)
                continue
            await self._write(key, obj, addresses, written)
        return due

    async def _write(
        self,
        key: Key,
        obj: dict[str, Any],
        addresses: Addresses,
        before: _Written | None,
        *,
        only_over: Addresses | None = None,  # write only while the status says this
    ) -> None:
        strikes = before.strikes + 1 if before is not None and before.addresses == addresses else 0
        if strikes:
            log.warning(
                "status: %s/%s says %s, not %s: someone else writes it too (another controller "
                "of this class?); writing it back (%d)",
                *key,
                shown(ingress_addresses(obj)),
                shown(addresses),
                strikes,
            )
        self._written[key] = _Written(
            addresses, time.monotonic() + self._rewrite_backoff.delay(strikes), strikes
        )
        for _attempt in range(3):
            try:
                written = await self._client.replace_ingress_status(with_addresses(obj, addresses))
            except NotFound:
                self._objects.pop(key, None)
                return
            except Conflict:  # changed since we saw it: compare the current one again
                try:
                    obj = self._objects[key] = await self._client.get_ingress(*key)
                except NotFound:
                    self._objects.pop(key, None)
                    return
                except KubeError as exc:
                    log.warning("status: cannot read %s/%s: %s; retrying later", *key, exc)
                    return
                now = ingress_addresses(obj)
                if now == addresses or only_over not in (None, now):
                    return
                continue
            except KubeError as exc:  # the client retried what can be retried already
                log.warning("status: cannot update %s/%s: %s; retrying later", *key, exc)
                return
            self.writes += 1
            self._objects[key] = written
            log.info(
                "status: %s/%s address %s (was %s)", *key, shown(addresses), shown(ingress_addresses(obj))
            )
            return
        log.warning("status: %s/%s kept changing under us; retrying later", *key)

    async def _shutdown(self) -> None:
        """``--update-status-on-shutdown``: clear the address we wrote, still as leader."""
        addresses = self._addresses
        if addresses is None:
            return
        for key in sorted(self._claimed):
            obj = self._objects.get(key)
            if obj is not None and ingress_addresses(obj) == addresses:
                await self._write(key, obj, (), None, only_over=addresses)


__all__ = [
    "PublishAddress",
    "PublishService",
    "StatusWriter",
    "entries_of",
    "ingress_addresses",
    "lease_name",
    "normalized",
    "parse_publish_address",
    "service_addresses",
    "with_addresses",
]
