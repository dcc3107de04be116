"""Leader election: the pure decision as a table, then electors against the fake API server."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from canary_proxy.k8s import Backoff, KubeClient, load_config
from canary_proxy.k8s.lease import (
    LeaderElector,
    LeaseRecord,
    LeaseRef,
    LeaseTiming,
    Observed,
    decide,
    default_identity,
    micro_time,
    released,
)
from tests.fakekube import FakeKube
from tests.scrape import eventually

ME, OTHER = "pod-a_1", "pod-b_2"
T0, T1 = "2026-01-01T00:00:00.000001Z", "2026-01-01T00:00:05.000001Z"
SHORT = LeaseTiming(lease_duration=2.0, renew_deadline=1.0, retry_period=0.2)
REF = LeaseRef("default", "canary-proxy-leader-test")


def lease(holder: str, *, duration: int = 15, transitions: int = 3, acquired: str = T0) -> dict[str, Any]:
    spec = {
        "holderIdentity": holder,
        "leaseDurationSeconds": duration,
        "acquireTime": acquired,
        "renewTime": acquired,
        "leaseTransitions": transitions,
    }
    return {"metadata": {"name": "l", "namespace": "default", "resourceVersion": "7"}, "spec": spec}


def step(
    current: dict[str, Any] | None, *, now: float, seen: tuple[dict[str, Any], float] | None = None
) -> Any:
    observed = Observed(LeaseRecord.of(seen[0]), seen[1]) if seen else None
    return decide(current, identity=ME, now=now, stamp=T1, observed=observed, lease_seconds=15)


# -- the decision --------------------------------------------------------------------------------


def test_no_lease_creates_one_held_by_us() -> None:
    result = step(None, now=100.0)
    assert result.action == "create"
    assert result.record == LeaseRecord(ME, 15, T1, T1, 0)


@pytest.mark.parametrize(
    ("current", "now", "seen", "action", "holder", "transitions"),
    [
        # someone else's, seen for the first time: its clock starts now, whatever renewTime says
        (lease(OTHER), 100.0, None, "wait", OTHER, 3),
        # seen unchanged for less than its duration: still theirs
        (lease(OTHER), 114.9, (lease(OTHER), 100.0), "wait", OTHER, 3),
        # seen unchanged for its whole duration: expired, taken over, one more transition
        (lease(OTHER), 115.0, (lease(OTHER), 100.0), "write", ME, 4),
        # it changed since (renewed): the clock restarts, however long ago we first looked
        (lease(OTHER, acquired=T1), 200.0, (lease(OTHER), 100.0), "wait", OTHER, 3),
        # released (no holder): free at once
        (lease(""), 100.0, None, "write", ME, 4),
        # a holder with a zero duration has expired already
        (lease(OTHER, duration=0), 100.0, None, "write", ME, 4),
        # ours: renewed, transitions kept
        (lease(ME), 100.0, None, "write", ME, 3),
    ],
    ids=["fresh", "not-expired", "expired", "renewed-meanwhile", "released", "zero-duration", "ours"],
)
def test_decide(
    current: dict[str, Any],
    now: float,
    seen: tuple[dict[str, Any], float] | None,
    action: str,
    holder: str,
    transitions: int,
) -> None:
    result = step(current, now=now, seen=seen)
    assert (result.action, result.record.holder, result.record.transitions) == (action, holder, transitions)


def test_renewing_keeps_the_acquire_time_and_taking_over_sets_it() -> None:
    renewed = step(lease(ME), now=100.0).record
    assert (renewed.acquire_time, renewed.renew_time) == (T0, T1)
    taken = step(lease(""), now=100.0).record
    assert (taken.acquire_time, taken.renew_time) == (T1, T1)


def test_the_observation_is_kept_while_the_record_is_unchanged() -> None:
    first = step(lease(OTHER), now=100.0)
    again = decide(lease(OTHER), identity=ME, now=110.0, stamp=T1, observed=first.observed, lease_seconds=15)
    assert again.observed.since == 100.0


def test_release_empties_the_holder_only_if_ours() -> None:
    assert released(lease(ME), identity=ME, stamp=T1) == LeaseRecord("", 1, T1, T1, 3)
    assert released(lease(OTHER), identity=ME, stamp=T1) is None


def test_micro_time_always_has_six_fraction_digits() -> None:
    assert micro_time(datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)) == "2026-01-02T03:04:05.000001Z"
    assert micro_time(datetime(2026, 1, 2, 3, 4, 5, 120, tzinfo=UTC)) == "2026-01-02T03:04:05.000120Z"


def test_identity_is_the_pod_name_and_a_random_suffix() -> None:
    one, two = (
        default_identity({"HOSTNAME": "proxy-7d9f-abcde"}),
        default_identity({"HOSTNAME": "proxy-7d9f-abcde"}),
    )
    assert one.startswith("proxy-7d9f-abcde_") and one != two


@pytest.mark.parametrize(
    "durations",
    [(2, 2, 0.5), (2, 1, 1), (0.5, 0.2, 0.1)],
    ids=["renew-not-below-lease", "retry-too-long", "lease-below-1s"],
)
def test_timing_refuses_an_unsafe_combination(durations: tuple[float, float, float]) -> None:
    with pytest.raises(ValueError):
        LeaseTiming(*durations)


def test_default_timing_is_client_gos() -> None:
    assert LeaseTiming() == LeaseTiming(15.0, 10.0, 2.0)


# -- electors against the fake API ---------------------------------------------------------------

FAST = Backoff(base=0.01, cap=0.05)
WAIT = 10.0


def holder(fake: FakeKube) -> str:
    obj = fake.get_object("leases", REF.name, namespace=REF.namespace)
    return str((obj or {}).get("spec", {}).get("holderIdentity") or "")


Start = Callable[[str], Awaitable[tuple[LeaderElector, asyncio.Task[None]]]]


@pytest.fixture
async def start(fake_kube: FakeKube) -> AsyncIterator[Start]:
    """Start an elector (its own client, as a separate replica) whose ``lead`` waits forever."""
    assert fake_kube.kubeconfig is not None
    config = await load_config(fake_kube.kubeconfig)
    stack = contextlib.AsyncExitStack()
    tasks: list[asyncio.Task[None]] = []

    async def start(identity: str) -> tuple[LeaderElector, asyncio.Task[None]]:
        client = await stack.enter_async_context(KubeClient(config, backoff=FAST))
        elector = LeaderElector(client, REF, identity=identity, timing=SHORT)
        task = asyncio.create_task(elector.run(lambda: asyncio.Event().wait()))
        tasks.append(task)
        return elector, task

    async with stack:
        yield start
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_one_of_two_leads_and_the_other_takes_over_when_it_stops(
    fake_kube: FakeKube, start: Start
) -> None:
    electors = {"a": await start("a"), "b": await start("b")}
    first = await eventually(lambda: holder(fake_kube), timeout=WAIT, what="a leader")
    (leader, leader_task), (other, _) = electors[first], electors["b" if first == "a" else "a"]
    await eventually(lambda: leader.is_leader, timeout=WAIT, what="leading")
    renewals = fake_kube.requests["update"]
    await eventually(
        lambda: fake_kube.requests["update"] >= renewals + 3, timeout=WAIT, what="three renewals"
    )
    assert not other.is_leader and holder(fake_kube) == first  # the other stayed a candidate
    assert other.leader == first  # it knows who leads

    stopped = time.monotonic()
    leader_task.cancel()
    await eventually(lambda: other.is_leader, timeout=WAIT, what="takeover")
    # Released on a clean stop: taken at the next attempt, not a lease duration later.
    assert time.monotonic() - stopped < SHORT.lease_duration
    spec = fake_kube.get_object("leases", REF.name)["spec"]  # type: ignore[index]
    assert spec["holderIdentity"] == other.identity
    assert spec["leaseTransitions"] == 1  # created (0), released (kept), taken over (+1)


async def test_a_leader_that_cannot_renew_steps_down_before_the_lease_expires(
    fake_kube: FakeKube, start: Start
) -> None:
    electors = [await start("a"), await start("b")]
    await eventually(lambda: holder(fake_kube), timeout=WAIT, what="a leader")
    leader = next(e for e, _ in electors if e.identity == holder(fake_kube))
    await eventually(lambda: leader.is_leader, timeout=WAIT, what="leading")
    fake_kube.fail_next(10_000, status=500, verb="update")  # nobody can write the Lease
    failing = time.monotonic()
    await eventually(lambda: not leader.is_leader, timeout=WAIT, what="stepping down")
    # Stepped down within the renew deadline (and one attempt), before others may take over.
    assert time.monotonic() - failing < SHORT.renew_deadline + 2 * SHORT.retry_period
    assert not any(e.is_leader for e, _ in electors)
    fake_kube._failures.clear()
    await eventually(lambda: any(e.is_leader for e, _ in electors), timeout=WAIT, what="a new leader")
    assert sum(e.is_leader for e, _ in electors) == 1
