"""Leader election with a ``coordination.k8s.io/v1`` Lease, as client-go's leaderelection.

The algorithm, one attempt (``decide``, pure; client-go's ``tryAcquireOrRenew``):

1. Read the Lease. None yet: create it, holding it ourselves (transitions 0).
2. Remember when we first saw its current record (holder, duration, times, transitions):
   expiry is judged on *our* clock, from that moment, never from the ``renewTime`` written
   by another machine's clock -- so clock skew between nodes cannot shorten a lease.
3. Held by someone else, and seen unchanged for less than its ``leaseDurationSeconds``:
   wait. An empty ``holderIdentity`` (a released Lease) is free at once.
4. Otherwise write it, with the resourceVersion we read: renewing our own keeps
   ``acquireTime`` and ``leaseTransitions``; taking it over sets ``acquireTime`` and adds
   one transition. Whoever loses the race gets 409 Conflict and stays a candidate.

The loop (``LeaderElector.run``): a candidate attempts every ``retry_period`` (with up to
20 % jitter, as client-go's 1.2 factor) until it holds the Lease. The leader then runs
the caller's ``lead`` coroutine and renews every ``retry_period``; if no renewal has
succeeded for ``renew_deadline`` (shorter than ``lease_duration``), it cancels ``lead``
-- stops acting as leader -- before anyone else can see the Lease expire, and becomes a
candidate again. On a clean shutdown (cancellation) it cancels ``lead`` and releases the
Lease, as client-go's ``ReleaseOnCancel``: empty holder, duration 1 s, so the next
candidate takes over at its next attempt rather than a whole lease duration later.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Literal

from .client import KubeClient
from .errors import Conflict, KubeError, NotFound

logger = logging.getLogger(__name__)

JITTER = 1.2  # client-go's JitterFactor: a candidate waits retry_period * [1, 1.2)


@dataclass(frozen=True, slots=True)
class LeaseTiming:
    """The three durations of an election, in seconds; defaults as kube-controller-manager's
    (client-go's recommended values)."""

    lease_duration: float = 15.0  # how long others wait, from the last change they saw, to take over
    renew_deadline: float = 10.0  # the leader steps down when no renewal succeeded for this long
    retry_period: float = 2.0  # between attempts: a candidate's to acquire, the leader's to renew

    def __post_init__(self) -> None:
        if self.lease_duration < 1:
            raise ValueError("lease duration: at least 1s (the Lease holds whole seconds)")
        if not self.lease_duration > self.renew_deadline:
            raise ValueError("the lease duration must be longer than the renew deadline")
        if not self.renew_deadline > JITTER * self.retry_period > 0:
            raise ValueError(f"the renew deadline must be longer than {JITTER:g} x the retry period")

    @property
    def lease_seconds(self) -> int:
        """``leaseDurationSeconds`` as written: whole seconds, rounded up (never shorter)."""
        return max(1, -int(-self.lease_duration // 1))


# -- the pure part ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LeaseRecord:
    """A Lease's ``spec``, the fields the election reads and writes."""

    holder: str = ""
    lease_duration_seconds: int = 0
    acquire_time: str = ""  # MicroTime, RFC 3339 with microseconds
    renew_time: str = ""
    transitions: int = 0

    @classmethod
    def of(cls, lease: Mapping[str, Any]) -> LeaseRecord:
        spec = lease.get("spec") or {}
        return cls(
            str(spec.get("holderIdentity") or ""),
            int(spec.get("leaseDurationSeconds") or 0),
            str(spec.get("acquireTime") or ""),
            str(spec.get("renewTime") or ""),
            int(spec.get("leaseTransitions") or 0),
        )

    def spec(self) -> dict[str, Any]:
        return {
            "holderIdentity": self.holder,
            "leaseDurationSeconds": self.lease_duration_seconds,
            "acquireTime": self.acquire_time,
            "renewTime": self.renew_time,
            "leaseTransitions": self.transitions,
        }


@dataclass(frozen=True, slots=True)
class Observed:
    """The record last seen, and when it was first seen so (a monotonic time)."""

    record: LeaseRecord
    since: float


@dataclass(frozen=True, slots=True)
class Step:
    """What to do after reading the Lease: ``write`` this record (creating the Lease if
    ``create``), or ``wait`` because another holds it."""

    action: Literal["create", "write", "wait"]
    observed: Observed  # to pass to the next ``decide``
    record: LeaseRecord  # to write; for "wait", the current one
    reason: str  # for the log


def decide(
    lease: Mapping[str, Any] | None,
    *,
    identity: str,
    now: float,
    stamp: str,
    observed: Observed | None,
    lease_seconds: int,
) -> Step:
    """One attempt to acquire or renew, from the Lease as read (None: absent): see the
    module docstring. ``now`` is monotonic seconds (expiry is judged with it), ``stamp``
    the wall-clock MicroTime to write."""
    if lease is None:
        record = LeaseRecord(identity, lease_seconds, stamp, stamp, 0)
        return Step("create", Observed(record, now), record, "no lease yet")
    current = LeaseRecord.of(lease)
    if observed is None or observed.record != current:
        observed = Observed(current, now)
    if current.holder and current.holder != identity:
        left = observed.since + current.lease_duration_seconds - now
        if left > 0:
            reason = f"held by {current.holder}, unchanged for another {left:.1f}s"
            return Step("wait", observed, current, reason)
        reason = f"{current.holder} did not renew within {current.lease_duration_seconds}s"
        return Step("write", observed, _taken(current, identity, stamp, lease_seconds), reason)
    if current.holder == identity:
        renewed = replace(current, renew_time=stamp, lease_duration_seconds=lease_seconds)
        return Step("write", observed, renewed, "renewing")
    return Step("write", observed, _taken(current, identity, stamp, lease_seconds), "released")


def _taken(current: LeaseRecord, identity: str, stamp: str, lease_seconds: int) -> LeaseRecord:
    return LeaseRecord(identity, lease_seconds, stamp, stamp, current.transitions + 1)


def released(lease: Mapping[str, Any], *, identity: str, stamp: str) -> LeaseRecord | None:
    """The record that gives up the Lease (client-go's ``ReleaseOnCancel``: no holder, a
    1 s duration, transitions kept), or None if it is not ours to release."""
    current = LeaseRecord.of(lease)
    if current.holder != identity:
        return None
    return LeaseRecord("", 1, stamp, stamp, current.transitions)


def with_record(lease: Mapping[str, Any], record: LeaseRecord) -> dict[str, Any]:
    """The Lease's JSON with ``record`` as its spec; other spec fields and the metadata
    (its resourceVersion: the write's precondition) are kept."""
    return {**lease, "spec": {**(lease.get("spec") or {}), **record.spec()}}


def micro_time(when: datetime) -> str:
    """A MicroTime as the API server parses it: RFC 3339 with exactly six fraction digits.

    The client's models write times with ``isoformat()``, which drops a zero fraction, and
    the server then refuses the Lease: so a time on a whole second is moved by 1 us.
    """
    when = when.astimezone(UTC)
    if when.microsecond == 0:
        when = when.replace(microsecond=1)
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def default_identity(environ: Mapping[str, str] = os.environ) -> str:
    """The pod's name (``$HOSTNAME``) and a random suffix: unique even across restarts of
    one pod, as kube-controller-manager's ``hostname_uuid``."""
    host = environ.get("HOSTNAME") or socket.gethostname()
    return f"{host}_{uuid.uuid4()}"


# -- the loop -----------------------------------------------------------------------------------

Lead = Callable[[], Coroutine[Any, Any, object]]


@dataclass(frozen=True, slots=True)
class LeaseRef:
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


class LeaderElector:
    """Campaign for one Lease; run ``lead`` while holding it (see the module docstring)."""

    def __init__(
        self,
        client: KubeClient,
        lease: LeaseRef,
        *,
        identity: str,
        timing: LeaseTiming = LeaseTiming(),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self.lease = lease
        self.identity = identity
        self.timing = timing
        self._clock = clock
        self._observed: Observed | None = None
        self._raw: dict[str, Any] | None = None  # the Lease as last read or written
        self._leading = False
        self._renewed = float("-inf")  # monotonic time of the last successful write
        self.on_change: list[Callable[[bool], None]] = []  # called with is_leader on each change

    @property
    def is_leader(self) -> bool:
        return self._leading

    @property
    def leader(self) -> str:
        """The holder as last seen ("" if none)."""
        return self._observed.record.holder if self._observed else ""

    async def run(self, lead: Lead, *, on_shutdown: Lead | None = None) -> None:
        """Forever: acquire, lead until leadership is lost, acquire again. Cancelling it
        cancels ``lead``, runs ``on_shutdown`` if still leader (within the renew deadline
        of the last renewal: no longer than leadership is sure), then releases the Lease."""
        try:
            while True:
                await self._acquire()
                await self._lead_while_renewing(lead)
                await asyncio.sleep(self._jittered())  # lost it: a pause before campaigning again
        finally:
            left = self._renewed + self.timing.renew_deadline - self._clock()
            if on_shutdown is not None and self._holds() and left > 0:
                try:
                    async with asyncio.timeout(left):
                        await on_shutdown()
                except Exception as exc:  # a failed shutdown step must not skip the release
                    logger.warning("lease %s: the leader's shutdown step failed: %r", self.lease, exc)
            await self._release()

    def _holds(self) -> bool:
        """The Lease as last read or written names us."""
        return self._raw is not None and LeaseRecord.of(self._raw).holder == self.identity

    async def try_acquire_or_renew(self) -> bool:
        """One attempt: read the Lease, ``decide``, write. True if we hold it afterwards."""
        lease = self.lease
        try:
            current: dict[str, Any] | None = await self._client.get_lease(lease.namespace, lease.name)
        except NotFound:
            current = None
        step = decide(
            current,
            identity=self.identity,
            now=self._clock(),
            stamp=micro_time(datetime.now(UTC)),
            observed=self._observed,
            lease_seconds=self.timing.lease_seconds,
        )
        self._saw(step.observed, current)
        if step.action == "wait":
            logger.debug("lease %s: %s", lease, step.reason)
            return False
        if step.action == "create":
            meta = {"name": lease.name, "namespace": lease.namespace}
            written = await self._client.create_lease(
                lease.namespace, {"metadata": meta, "spec": step.record.spec()}
            )
        else:
            assert current is not None
            written = await self._client.replace_lease(lease.namespace, with_record(current, step.record))
        if step.record.holder != step.observed.record.holder:
            logger.info("lease %s: acquired (%s)", lease, step.reason)
        self._renewed = self._clock()
        self._saw(Observed(LeaseRecord.of(written), self._renewed), written)
        return True

    def _saw(self, observed: Observed, raw: dict[str, Any] | None) -> None:
        old = self.leader
        self._observed, self._raw = observed, raw
        if observed.record.holder != old and observed.record.holder not in ("", self.identity):
            logger.info("lease %s: the leader is %s", self.lease, observed.record.holder)

    async def _attempt(self) -> bool:
        """``try_acquire_or_renew``, with API errors logged and counted as a failed attempt."""
        try:
            return await self.try_acquire_or_renew()
        except Conflict:
            logger.info("lease %s: another candidate wrote it first", self.lease)
        except KubeError as exc:
            logger.warning("lease %s: %s", self.lease, exc)
        return False

    async def _acquire(self) -> None:
        while True:
            if await self._attempt():
                break
            await asyncio.sleep(self._jittered())
        logger.info("lease %s: leading as %s", self.lease, self.identity)
        self._set_leading(True)

    async def _lead_while_renewing(self, lead: Lead) -> None:
        """Run ``lead`` and renew every retry period, until no renewal has succeeded for the
        renew deadline, or another holds the Lease, or ``lead`` ends (a bug: it is logged).
        Then stop leading -- ``lead`` is cancelled -- and release what we may still hold."""
        task = asyncio.create_task(lead())
        try:
            renewed = self._clock()
            while not task.done():
                await asyncio.wait({task}, timeout=self.timing.retry_period)
                if task.done():
                    break
                if await self._renew(deadline=renewed + self.timing.renew_deadline):
                    renewed = self._clock()
                elif self._clock() - renewed >= self.timing.renew_deadline or self.leader != self.identity:
                    logger.warning(
                        "lease %s: not renewed for %.1fs (deadline %gs; holder %s): stepping down",
                        self.lease,
                        self._clock() - renewed,
                        self.timing.renew_deadline,
                        self.leader or "none",
                    )
                    break
        finally:
            self._set_leading(False)
            ended = task.done()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if ended:
            error = None if task.cancelled() else task.exception()
            logger.error("lease %s: the leader's work ended (%r): stepping down", self.lease, error)
        await self._release()

    async def _renew(self, *, deadline: float) -> bool:
        """One renewal attempt, cut short at ``deadline`` (a monotonic time)."""
        try:
            async with asyncio.timeout(max(deadline - self._clock(), 0.001)):
                return await self._attempt()
        except TimeoutError:
            return False

    def _set_leading(self, leading: bool) -> None:
        if leading != self._leading:
            self._leading = leading
            for callback in self.on_change:
                callback(leading)

    async def _release(self) -> None:
        """Give the Lease up if we hold it (bounded: a shutdown must not hang on the API)."""
        self._set_leading(False)
        raw = self._raw
        if raw is None or not self._holds():
            return
        record = released(raw, identity=self.identity, stamp=micro_time(datetime.now(UTC)))
        assert record is not None
        try:
            async with asyncio.timeout(self.timing.retry_period):
                written = await self._client.replace_lease(self.lease.namespace, with_record(raw, record))
        except (KubeError, TimeoutError) as exc:
            expiry = self.timing.lease_seconds
            logger.warning("lease %s: could not release it (%s); it expires in %ss", self.lease, exc, expiry)
            return
        self._saw(Observed(LeaseRecord.of(written), self._clock()), written)
        logger.info("lease %s: released", self.lease)

    def _jittered(self) -> float:
        return self.timing.retry_period * random.uniform(1.0, JITTER)


__all__ = [
    "LeaderElector",
    "LeaseRecord",
    "LeaseRef",
    "LeaseTiming",
    "Observed",
    "Step",
    "decide",
    "default_identity",
    "micro_time",
    "released",
    "with_record",
]
