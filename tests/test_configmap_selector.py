"""follow_configmap_selector: ConfigMaps picked by label, as routes, against the fake API."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

import pytest

from canary_proxy.k8s import Backoff
from canary_proxy.sources.configmap import follow_configmap_selector, raw_from_data
from canary_proxy.sources.raw import RawConfig

from .fakekube import FakeKube

NS = "default"
SELECTOR = "canary-proxy.io/route=true"
ROUTE = {"canary-proxy.io/route": "true"}
PROMPT = 1.0  # seconds: every add, change and delete must take effect within this
WAIT = 5.0  # seconds: the bound on waits that include reconnecting
FAST = Backoff(base=0.01, cap=0.05)


@dataclass
class Follower:
    """follow_configmap_selector running in a task; tests await what it yields."""

    yields: asyncio.Queue[RawConfig | BaseException] = field(default_factory=asyncio.Queue)

    async def next(self, within: float = WAIT) -> RawConfig:
        raw = await asyncio.wait_for(self.yields.get(), within)
        if isinstance(raw, BaseException):
            raise raw
        assert raw.data is None and raw.routes is not None
        return raw

    async def routes(self, within: float = WAIT) -> dict[str, dict[str, str]]:
        """The next yield, as ``{"NAMESPACE/NAME": data}``, in the order yielded."""
        raw = await self.next(within)
        return {route.name: dict(route.data or {}) for route in raw.routes or ()}

    async def pump(self, fake: FakeKube, namespace: str | None, selector: str) -> None:
        assert fake.kubeconfig is not None
        source = follow_configmap_selector(
            selector, namespace=namespace, kubeconfig=str(fake.kubeconfig), backoff=FAST
        )
        try:
            async for raw in source:
                self.yields.put_nowait(raw)
        except Exception as exc:  # surfaced by next(), not lost in the task
            self.yields.put_nowait(exc)


@contextlib.asynccontextmanager
async def following(
    fake: FakeKube, namespace: str | None = NS, selector: str = SELECTOR
) -> AsyncIterator[Follower]:
    follower = Follower()
    task = asyncio.create_task(follower.pump(fake, namespace, selector))
    try:
        yield follower
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class Records(logging.Handler):
    """Log records of canary_proxy, to await one without polling."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.seen: list[logging.LogRecord] = []
        self.queue: asyncio.Queue[logging.LogRecord] = asyncio.Queue()

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append(record)
        self.queue.put_nowait(record)

    async def wait(self, match: Callable[[str], bool]) -> logging.LogRecord:
        async with asyncio.timeout(WAIT):
            while not match((record := await self.queue.get()).getMessage()):
                pass
        return record

    def count(self, match: Callable[[str], bool]) -> int:
        return sum(1 for record in self.seen if match(record.getMessage()))


@pytest.fixture
def records() -> Iterator[Records]:
    logger = logging.getLogger("canary_proxy")
    handler, level = Records(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


def unavailable(message: str) -> bool:
    return "API unavailable" in message


async def test_the_first_list_yields_every_matching_configmap_in_creation_order(fake_kube: FakeKube) -> None:
    fake_kube.put_configmap("late", {"k": "late"}, labels=ROUTE, created="2024-06-01T00:00:00Z")
    fake_kube.put_configmap("b", {"k": "b"}, labels=ROUTE, created="2024-01-01T00:00:00Z")
    fake_kube.put_configmap("a", {"k": "a"}, labels=ROUTE, created="2024-01-01T00:00:00Z")
    fake_kube.put_configmap("unlabelled", {"k": "x"})
    fake_kube.put_configmap("other", {"k": "x"}, labels={"canary-proxy.io/route": "false"})
    fake_kube.put_configmap("elsewhere", {"k": "x"}, labels=ROUTE, namespace="team")
    async with following(fake_kube) as follower:
        raw = await follower.next()
    assert [route.name for route in raw.routes or ()] == ["default/a", "default/b", "default/late"]
    first = (raw.routes or ())[0]
    assert first.order == ("2024-01-01T00:00:00Z", "default/a")
    assert (first.data, first.error) == ({"k": "a"}, None)
    assert first.digest == raw_from_data({"k": "a"}).digest  # as the one-ConfigMap source's


async def test_annotations_are_the_recorded_rollout_ones_and_data_may_be_missing(
    fake_kube: FakeKube,
) -> None:
    notes = {"canary-proxy.io/phase": "Progressing", "kubectl.kubernetes.io/last-applied": "{}"}
    fake_kube.put_configmap("empty", None, labels=ROUTE, annotations=notes)
    async with following(fake_kube) as follower:
        [route] = (await follower.next()).routes or ()
    assert "data" not in (fake_kube.configmap("empty") or {})
    assert (route.data, route.annotations) == ({}, {"canary-proxy.io/phase": "Progressing"})


async def test_nothing_matching_yields_no_routes(fake_kube: FakeKube) -> None:
    fake_kube.put_configmap("unlabelled", {"k": "x"})
    async with following(fake_kube) as follower:
        assert await follower.routes() == {}


async def test_add_change_and_delete_each_take_effect_within_a_second(fake_kube: FakeKube) -> None:
    fake_kube.put_configmap("a", {"k": "0"}, labels=ROUTE)
    async with following(fake_kube) as follower:
        first = await follower.next()
        fake_kube.put_configmap("b", {"k": "0"}, labels=ROUTE)
        added = await follower.next(PROMPT)
        fake_kube.patch_configmap("a", {"k": "1"})
        changed = await follower.next(PROMPT)
        fake_kube.delete_configmap("b")
        deleted = await follower.next(PROMPT)
        fake_kube.put_configmap("a", {"k": "1"}, labels={})  # no longer selected
        unselected = await follower.next(PROMPT)
    assert [len(raw.routes or ()) for raw in (first, added, changed, deleted, unselected)] == [1, 2, 2, 1, 0]
    assert len({raw.digest for raw in (first, added, changed, deleted, unselected)}) == 5
    assert [dict(route.data or {}) for route in deleted.routes or ()] == [{"k": "1"}]


async def test_changes_that_change_no_route_are_not_yielded(fake_kube: FakeKube) -> None:
    fake_kube.put_configmap("a", {"k": "0"}, labels=ROUTE)
    async with following(fake_kube) as follower:
        first = await follower.next()
        fake_kube.put_configmap("a", {"k": "0"}, labels=ROUTE | {"team": "x"}, annotations={"other": "1"})
        fake_kube.put_configmap("unlabelled", {"k": "1"})
        phase = {"canary-proxy.io/phase": "Paused"}
        fake_kube.put_configmap("a", {"k": "0"}, annotations=phase)  # the rollout's state
        paused = await follower.next(PROMPT)  # the first yield after the irrelevant changes
        assert follower.yields.empty()
    assert paused.digest == first.digest  # the same config, with the new rollout state
    assert [route.annotations for route in paused.routes or ()] == [phase]


@pytest.mark.parametrize(("namespace", "expected"), [("team", ["team/c"]), (None, ["default/a", "team/c"])])
async def test_one_namespace_or_all(fake_kube: FakeKube, namespace: str | None, expected: list[str]) -> None:
    fake_kube.put_configmap("a", {"k": "a"}, labels=ROUTE)
    fake_kube.put_configmap("c", {"k": "c"}, labels=ROUTE, namespace="team")
    async with following(fake_kube, namespace) as follower:
        assert sorted(await follower.routes()) == expected
        fake_kube.put_configmap("d", {"k": "d"}, labels=ROUTE, namespace="team")
        assert sorted(await follower.routes(PROMPT)) == sorted([*expected, "team/d"])


async def test_a_configmap_deleted_while_the_watch_was_gone_is_removed_on_relist_after_410(
    fake_kube: FakeKube, records: Records
) -> None:
    fake_kube.put_configmap("a", {"k": "a"}, labels=ROUTE)
    fake_kube.put_configmap("b", {"k": "b"}, labels=ROUTE)
    async with following(fake_kube) as follower:
        assert list(await follower.routes()) == ["default/a", "default/b"]
        fake_kube.cut_watches()  # if it is watching yet; either way its next watch gets 410:
        fake_kube.delete_configmap("a")
        fake_kube.compact()
        assert await follower.routes() == {"default/b": {"k": "b"}}
        await records.wait(lambda message: "relisting" in message)
    assert fake_kube.requests["list"] == 2


async def test_an_api_outage_yields_nothing_and_recovery_yields_the_truth(
    fake_kube: FakeKube, records: Records
) -> None:
    fake_kube.put_configmap("a", {"k": "a"}, labels=ROUTE)
    fake_kube.put_configmap("b", {"k": "b"}, labels=ROUTE)
    async with following(fake_kube) as follower:
        assert list(await follower.routes()) == ["default/a", "default/b"]
        await fake_kube.stop()
        fake_kube.delete_configmap("a")  # while the API is down
        fake_kube.patch_configmap("b", {"k": "b2"})
        fake_kube.put_configmap("c", {"k": "c"}, labels=ROUTE)
        await records.wait(unavailable)
        await records.wait(lambda message: "retry 3 " in message)
        assert follower.yields.empty()  # no empty set, nor anything else, while it is down
        await fake_kube.start()
        seen = [await follower.routes()]  # the replayed events, one yield per batch
        while seen[-1] != {"default/b": {"k": "b2"}, "default/c": {"k": "c"}}:
            seen.append(await follower.routes())
        await records.wait(lambda message: "available again" in message)
        fake_kube.put_configmap("d", {"k": "d"}, labels=ROUTE)
        assert "default/d" in await follower.routes(PROMPT)
    assert all(seen)
    assert records.count(unavailable) == 1  # one warning per outage, not one per retry


async def test_a_malformed_selector_fails_at_once(fake_kube: FakeKube) -> None:
    async with following(fake_kube, selector="tier in web") as follower:
        with pytest.raises(ValueError, match="invalid label selector"):
            await follower.next()
    assert fake_kube.requests["list"] == 0
