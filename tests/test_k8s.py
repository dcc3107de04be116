"""canary_proxy.k8s against the fake API server, through the real kubernetes client."""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from canary_proxy.k8s import (
    Backoff,
    Batch,
    Conflict,
    KubeClient,
    KubeError,
    NotFound,
    Selector,
    Unreachable,
    WatchEvent,
    WatchStatus,
    check_label_selector,
    load_config,
    parse_ref,
    update_configmap,
    watch_configmap,
    watch_configmaps,
)
from tests.fakekube import FakeKube

NS = "default"
WAIT = 5.0  # seconds: the bound on every wait for an event
FAST = Backoff(base=0.01, cap=0.05)


@pytest.fixture
async def kube(fake_kube: FakeKube) -> AsyncIterator[KubeClient]:
    assert fake_kube.kubeconfig is not None
    async with KubeClient(await load_config(fake_kube.kubeconfig), backoff=FAST) as kube:
        yield kube


@dataclass
class Watcher:
    """watch_configmap running in a task; tests await its events and statuses."""

    events: asyncio.Queue[WatchEvent | BaseException] = field(default_factory=asyncio.Queue)
    statuses: asyncio.Queue[WatchStatus] = field(default_factory=asyncio.Queue)
    received_at: dict[str, float] = field(default_factory=dict)  # resourceVersion -> time

    async def event(self) -> WatchEvent:
        async with asyncio.timeout(WAIT):
            event = await self.events.get()
        if isinstance(event, BaseException):
            raise event
        return event

    async def status(self, state: str) -> WatchStatus:
        """The next status in ``state``, skipping the others."""
        async with asyncio.timeout(WAIT):
            while (status := await self.statuses.get()).state != state:
                pass
        return status

    async def pump(self, kube: KubeClient, name: str, options: dict[str, Any]) -> None:
        events = watch_configmap(kube, NS, name, on_status=self.statuses.put_nowait, **options)
        try:
            async with contextlib.aclosing(events):
                async for event in events:
                    self.received_at[event.resource_version] = time.perf_counter()
                    self.events.put_nowait(event)
        except Exception as exc:  # surfaced by event(), not lost in the task
            self.events.put_nowait(exc)


@dataclass
class BatchWatcher:
    """watch_configmaps running in a task; tests await its batches and statuses."""

    batches: asyncio.Queue[Batch | BaseException] = field(default_factory=asyncio.Queue)
    statuses: asyncio.Queue[WatchStatus] = field(default_factory=asyncio.Queue)

    async def batch(self) -> dict[str, tuple[str, dict[str, str]]]:
        """The next batch, as ``{"NAMESPACE/NAME": (type, data)}``."""
        async with asyncio.timeout(WAIT):
            batch = await self.batches.get()
        if isinstance(batch, BaseException):
            raise batch
        return {f"{e.namespace}/{e.name}": (e.type, dict(e.data)) for e in batch}

    async def status(self, state: str) -> WatchStatus:
        async with asyncio.timeout(WAIT):
            while (status := await self.statuses.get()).state != state:
                pass
        return status

    async def pump(self, kube: KubeClient, selector: Selector, options: dict[str, Any]) -> None:
        batches = watch_configmaps(kube, selector, on_status=self.statuses.put_nowait, **options)
        try:
            async with contextlib.aclosing(batches):
                async for batch in batches:
                    self.batches.put_nowait(batch)
        except Exception as exc:
            self.batches.put_nowait(exc)


@contextlib.asynccontextmanager
async def watching_selector(kube: KubeClient, selector: Selector) -> AsyncIterator[BatchWatcher]:
    watcher = BatchWatcher()
    options = {"timeout_seconds": 5, "idle_slack": 1.0, "backoff": FAST}
    task = asyncio.create_task(watcher.pump(kube, selector, options))
    try:
        yield watcher
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@contextlib.asynccontextmanager
async def watching(kube: KubeClient, name: str = "cfg", **options: Any) -> AsyncIterator[Watcher]:
    watcher = Watcher()
    options = {"timeout_seconds": 5, "idle_slack": 1.0, "backoff": FAST} | options
    task = asyncio.create_task(watcher.pump(kube, name, options))
    try:
        yield watcher
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# -- references and configuration --------------------------------------------------------------


@pytest.mark.parametrize(
    ("ref", "expected"),
    [("cfg", (None, "cfg")), ("team-a/cfg.v1", ("team-a", "cfg.v1"))],
)
def test_parse_ref(ref: str, expected: tuple[str | None, str]) -> None:
    assert parse_ref(ref) == expected


@pytest.mark.parametrize("ref", ["", "a/b/c", "Team/cfg", "ns/", "/cfg", "cfg_1", "-cfg"])
def test_parse_ref_rejects(ref: str) -> None:
    with pytest.raises(ValueError, match="invalid"):
        parse_ref(ref)


@pytest.mark.parametrize(
    "selector", ["tier", "!canary", "tier=web", "tier==web", "tier!=web", " a in (x, y),ex.com/b notin (z) "]
)
def test_check_label_selector(selector: str) -> None:
    assert check_label_selector(selector) == selector.strip()


@pytest.mark.parametrize("selector", ["", " ", "tier in web", "a=b=c", "a,,b", "a b", "Bad_/x", "a in (x"])
def test_check_label_selector_rejects(selector: str) -> None:
    with pytest.raises(ValueError, match="label selector"):
        check_label_selector(selector)


async def test_kubeconfig_flag_wins_over_env(fake_kube: FakeKube, tmp_path: Path) -> None:
    flag = fake_kube.write_kubeconfig(tmp_path / "flag", namespace="from-flag")
    env = fake_kube.write_kubeconfig(tmp_path / "env", namespace="from-env")
    environ = {"KUBECONFIG": str(env)}
    assert (await load_config(flag, environ=environ)).namespace == "from-flag"
    config = await load_config(environ=environ)
    assert (config.namespace, config.source) == ("from-env", str(env))
    assert config.configuration.host == fake_kube.url


async def test_in_cluster_uses_service_account(fake_kube: FakeKube, tmp_path: Path) -> None:
    for file, text in [
        ("token", "sa-token"),
        ("ca.crt", "not checked here"),
        ("namespace", "pod-ns"),
    ]:
        (tmp_path / file).write_text(text)
    environ = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": "6443"}
    config = await load_config(environ=environ, service_account=tmp_path)
    assert (config.source, config.namespace) == ("in-cluster", "pod-ns")
    assert config.configuration.host == "https://127.0.0.1:6443"
    assert config.configuration.api_key["BearerToken"] == "bearer sa-token"
    kubeconfig = fake_kube.write_kubeconfig(tmp_path / "kc", namespace="kc-ns")
    flagged = await load_config(kubeconfig, environ=environ, service_account=tmp_path)
    assert flagged.namespace == "kc-ns"


async def test_missing_kubeconfig_is_a_kube_error(tmp_path: Path) -> None:
    with pytest.raises(KubeError, match="no kubeconfig"):
        await load_config(tmp_path / "absent", environ={})


# -- single calls ------------------------------------------------------------------------------


async def test_get_and_patch_with_resource_version(fake_kube: FakeKube, kube: KubeClient) -> None:
    fake_kube.put_configmap("cfg", {"weight": "10", "old": "x"}, annotations={"a": "1"})
    data, annotations, version = await kube.get_configmap(NS, "cfg")
    assert (data, annotations) == ({"weight": "10", "old": "x"}, {"a": "1"})
    patched = await kube.patch_configmap(
        NS,
        "cfg",
        data={"weight": "20", "old": None},
        annotations={"b": "2"},
        resource_version=version,
    )
    assert patched.data == {"weight": "20"}
    assert patched.annotations == {"a": "1", "b": "2"}
    assert int(patched.resource_version) > int(version)
    with pytest.raises(Conflict, match="has been modified"):
        await kube.patch_configmap(NS, "cfg", data={"weight": "30"}, resource_version=version)
    assert fake_kube.configmap("cfg")["data"] == {"weight": "20"}  # type: ignore[index]


async def test_get_missing_configmap_is_not_found(kube: KubeClient) -> None:
    with pytest.raises(NotFound) as caught:
        await kube.get_configmap(NS, "absent")
    assert (caught.value.status, caught.value.reason) == (404, "NotFound")


async def test_calls_retry_server_errors_then_give_up(fake_kube: FakeKube, kube: KubeClient) -> None:
    fake_kube.put_configmap("cfg", {"k": "v"})
    fake_kube.fail_next(2, status=500, verb="get")
    assert (await kube.get_configmap(NS, "cfg")).data == {"k": "v"}
    fake_kube.fail_next(4, status=503, verb="get")
    with pytest.raises(Unreachable, match="503"):
        await kube.get_configmap(NS, "cfg")
    assert fake_kube.requests["get"] == 3 + 4  # each call: one try and three retries at most


async def test_unauthorized_is_not_retried(fake_kube: FakeKube, kube: KubeClient) -> None:
    fake_kube.token = "rotated"
    with pytest.raises(KubeError) as caught:
        await kube.get_configmap(NS, "cfg")
    assert caught.value.status == 401
    assert fake_kube.requests["get"] == 1


async def test_endpoints_and_events(fake_kube: FakeKube, kube: KubeClient) -> None:
    ports = [{"name": "http", "port": 8080}, {"name": "admin", "port": 9090}]
    subset = {"addresses": [{"ip": "127.0.0.3"}, {"ip": "127.0.0.2"}], "ports": ports}
    fake_kube.put_endpoints("app", [subset | {"notReadyAddresses": [{"ip": "127.0.0.9"}]}])
    assert await kube.get_endpoints(NS, "app", port="http") == [
        ("127.0.0.2", 8080),
        ("127.0.0.3", 8080),
    ]
    await kube.create_event(NS, kind="ConfigMap", name="cfg", reason="Promoted", message="hi")
    [event] = fake_kube.list_objects("events")
    assert event["involvedObject"] == {"kind": "ConfigMap", "name": "cfg", "namespace": NS}
    assert (event["reason"], event["type"]) == ("Promoted", "Normal")


# -- read-modify-write ---------------------------------------------------------------------------


def append(item: str) -> Any:
    def mutate(data: dict[str, str], annotations: dict[str, str]) -> Any:
        data["log"] = data["log"] + "," + item
        return data, annotations

    return mutate


async def test_concurrent_writers_are_all_applied(fake_kube: FakeKube, kube: KubeClient) -> None:
    fake_kube.put_configmap("cfg", {"log": "start"})
    writers = [update_configmap(kube, NS, "cfg", append(name)) for name in "abcde"]
    await asyncio.gather(*writers)
    log = fake_kube.configmap("cfg")["data"]["log"].split(",")  # type: ignore[index]
    assert log[0] == "start"
    assert sorted(log[1:]) == list("abcde")  # each write once: none lost, none doubled
    assert fake_kube.responses[409] >= 1  # they really did collide


async def test_update_without_change_writes_nothing(fake_kube: FakeKube, kube: KubeClient) -> None:
    fake_kube.put_configmap("cfg", {"k": "v"})
    state = await update_configmap(kube, NS, "cfg", lambda data, notes: (data, notes))
    assert state.data == {"k": "v"}
    assert fake_kube.requests["patch"] == 0


async def test_update_gives_up_after_retries(fake_kube: FakeKube, kube: KubeClient) -> None:
    fake_kube.put_configmap("cfg", {"log": "start"})
    fake_kube.fail_next(10, status=409, verb="patch")
    with pytest.raises(Conflict, match="after 2 retries"):
        await update_configmap(kube, NS, "cfg", append("x"), retries=2)
    assert fake_kube.requests["patch"] == 3


# -- watch -------------------------------------------------------------------------------------


async def test_watch_sees_added_then_modified_in_order(fake_kube: FakeKube, kube: KubeClient) -> None:
    fake_kube.put_configmap("cfg", {"n": "0"})
    async with watching(kube) as watcher:
        first = await watcher.event()
        assert (first.type, first.data) == ("ADDED", {"n": "0"})
        for n in range(1, 6):
            fake_kube.patch_configmap("cfg", {"n": str(n)})
        for n in range(1, 6):
            event = await watcher.event()
            assert (event.type, event.data) == ("MODIFIED", {"n": str(n)})
    query = fake_kube.watch_queries[0]
    assert query["fieldSelector"] == "metadata.name=cfg"
    assert (query["allowWatchBookmarks"], query["timeoutSeconds"]) == ("true", "5")


async def test_watch_carries_annotations_and_yields_a_change_to_them_alone(
    fake_kube: FakeKube, kube: KubeClient
) -> None:
    fake_kube.put_configmap("cfg", {"n": "0"}, annotations={"canary-proxy.io/phase": "Progressing"})
    async with watching(kube) as watcher:
        first = await watcher.event()
        assert first.annotations == {"canary-proxy.io/phase": "Progressing"}
        fake_kube.put_configmap("cfg", {"n": "0"}, annotations={"canary-proxy.io/phase": "Paused"})
        event = await watcher.event()
        assert (event.type, event.data) == ("MODIFIED", {"n": "0"})
        assert event.annotations == {"canary-proxy.io/phase": "Paused"}
        fake_kube.delete_configmap("cfg")
        event = await watcher.event()
        assert (event.type, event.data, event.annotations) == ("DELETED", {}, {})


async def test_watch_ignores_other_configmaps(fake_kube: FakeKube, kube: KubeClient) -> None:
    async with watching(kube) as watcher:
        assert (await watcher.event()).type == "DELETED"  # absent at the start
        fake_kube.put_configmap("other", {"x": "1"})
        fake_kube.put_configmap("cfg", {"n": "1"})
        event = await watcher.event()
        assert (event.type, event.data) == ("ADDED", {"n": "1"})


async def test_watch_delivers_deleted(fake_kube: FakeKube, kube: KubeClient) -> None:
    fake_kube.put_configmap("cfg", {"n": "0"})
    async with watching(kube) as watcher:
        await watcher.event()
        fake_kube.delete_configmap("cfg")
        event = await watcher.event()
        assert (event.type, event.data) == ("DELETED", {})


@pytest.mark.parametrize("as_http_status", [False, True], ids=["error-event", "http-410"])
async def test_watch_relists_after_compaction(
    fake_kube: FakeKube, kube: KubeClient, as_http_status: bool
) -> None:
    fake_kube.expire_with_http_status = as_http_status
    fake_kube.put_configmap("cfg", {"n": "0"})
    async with watching(kube) as watcher:
        await watcher.event()
        await watcher.status("watching")
        assert fake_kube.cut_watches() == 1  # while it is away: two writes, then compaction
        fake_kube.patch_configmap("cfg", {"n": "1"})
        fake_kube.patch_configmap("cfg", {"n": "2"})
        fake_kube.compact()
        relisting = await watcher.status("relisting")
        event = await watcher.event()
    assert relisting.error is not None and relisting.error.status == 410
    assert (event.type, event.data) == ("MODIFIED", {"n": "2"})
    assert fake_kube.requests["list"] == 2


async def test_watch_backs_off_when_relisting_keeps_failing(fake_kube: FakeKube, kube: KubeClient) -> None:
    fake_kube.put_configmap("cfg", {"n": "0"})
    fake_kube.fail_next(3, status=410, verb="watch")
    async with watching(kube) as watcher:
        delays = [(await watcher.status("relisting")).delay for _ in range(3)]
        await watcher.status("watching")
    assert delays[0] == 0 and all(0 < d <= FAST.cap for d in delays[1:])
    assert fake_kube.requests["list"] == 4


async def test_watch_reconnects_without_missing_updates(fake_kube: FakeKube, kube: KubeClient) -> None:
    fake_kube.put_configmap("cfg", {"n": "0"})
    async with watching(kube) as watcher:
        await watcher.event()
        for n in range(1, 4):
            await watcher.status("watching")
            assert fake_kube.cut_watches() == 1
            fake_kube.patch_configmap("cfg", {"n": str(n)})  # made while disconnected
            assert (await watcher.event()).data == {"n": str(n)}
    assert fake_kube.requests["list"] == 1  # resumed from its resourceVersion each time
    assert fake_kube.requests["watch"] == 4


async def test_watch_resumes_from_bookmarks(fake_kube: FakeKube, kube: KubeClient) -> None:
    fake_kube.put_configmap("cfg", {"n": "0"})
    async with watching(kube, timeout_seconds=1) as watcher:
        await watcher.event()
        await watcher.status("watching")
        fake_kube.put_configmap("other", {"x": "1"})  # moves the resourceVersion on
        await watcher.status("watching")  # the server ended the stream at timeoutSeconds
    assert fake_kube.watch_queries[1]["resourceVersion"] == fake_kube.resource_version
    assert fake_kube.requests["list"] == 1


async def test_watch_backs_off_on_server_errors(fake_kube: FakeKube, kube: KubeClient) -> None:
    fake_kube.put_configmap("cfg", {"n": "0"})
    fake_kube.fail_next(3, status=500, verb="list")
    async with watching(kube) as watcher:
        delays = [(await watcher.status("retrying")).delay for _ in range(3)]
        assert (await watcher.event()).data == {"n": "0"}
    assert all(0 < d <= FAST.cap for d in delays)
    assert fake_kube.requests["list"] == 4


async def test_watch_honours_retry_after(fake_kube: FakeKube, kube: KubeClient) -> None:
    fake_kube.put_configmap("cfg", {"n": "0"})
    async with watching(kube) as watcher:
        await watcher.event()
        await watcher.status("watching")
        fake_kube.fail_next(1, status=429, verb="watch", retry_after=1)
        fake_kube.cut_watches()
        fake_kube.patch_configmap("cfg", {"n": "1"})
        retrying = await watcher.status("retrying")  # the cut
        retrying = await watcher.status("retrying")  # the 429
        assert (await watcher.event()).data == {"n": "1"}
    assert retrying.error is not None and retrying.error.status == 429
    assert retrying.delay >= 1.0


async def test_watch_replaces_a_silent_stream(fake_kube: FakeKube, kube: KubeClient) -> None:
    fake_kube.put_configmap("cfg", {"n": "0"})
    fake_kube.stall_watches = True  # headers sent, then silence: a half-open connection
    async with watching(kube, timeout_seconds=1, idle_slack=0.2) as watcher:
        await watcher.event()
        retrying = await watcher.status("retrying")
        fake_kube.stall_watches = False
        fake_kube.patch_configmap("cfg", {"n": "1"})
        assert (await watcher.event()).data == {"n": "1"}
    assert "presumed dead" in str(retrying.error)


async def test_watch_waits_for_the_api_to_come_up(fake_kube: FakeKube, kube: KubeClient) -> None:
    fake_kube.put_configmap("cfg", {"n": "0"})
    await fake_kube.stop()
    async with watching(kube) as watcher:
        retrying = await watcher.status("retrying")
        await fake_kube.start()
        event = await watcher.event()
    assert isinstance(retrying.error, Unreachable)
    assert (event.type, event.data) == ("ADDED", {"n": "0"})


async def test_watch_rejects_a_timeout_past_the_client_timeout(kube: KubeClient) -> None:
    async with watching(kube, timeout_seconds=300) as watcher:
        with pytest.raises(ValueError, match="timeout_seconds"):
            await watcher.event()


@pytest.mark.slow
async def test_watch_latency(fake_kube: FakeKube, kube: KubeClient) -> None:
    """How long from a PATCH to the watcher yielding it, over 200 PATCHes: from the fake
    committing it, and from the client sending it (one process, one clock)."""
    fake_kube.put_configmap("cfg", {"n": "0"})
    from_commit, from_send = [], []
    async with watching(kube) as watcher:
        version = (await watcher.event()).resource_version
        for n in range(1, 201):
            sent = time.perf_counter()
            state = await kube.patch_configmap(NS, "cfg", data={"n": str(n)}, resource_version=version)
            version = (await watcher.event()).resource_version
            assert version == state.resource_version
            from_commit.append(watcher.received_at[version] - fake_kube.commit_times[int(version)])
            from_send.append(watcher.received_at[version] - sent)
    for label, latencies in [("commit", from_commit), ("send", from_send)]:
        cuts = statistics.quantiles(latencies, n=100)
        print(f"\nPATCH {label} -> watcher yield, {len(latencies)} PATCHes: ", end="")
        print(f"p50 {cuts[49] * 1000:.2f} ms, p99 {cuts[98] * 1000:.2f} ms")
    assert statistics.quantiles(from_commit, n=100)[98] < 0.5


# -- watch by label selector -------------------------------------------------------------------

ROUTE = {"canary-proxy.io/route": "true"}


def put_routes(fake: FakeKube) -> None:
    """Two selected ConfigMaps in two namespaces, and two that are not."""
    fake.put_configmap(
        "a", {"n": "a"}, labels=ROUTE, annotations={"note": "x"}, created="2024-01-01T00:00:00Z"
    )
    fake.put_configmap("b", {"n": "b"}, labels={"other": "true"})
    fake.put_configmap("c", {"n": "c"}, namespace="team", labels=ROUTE)
    fake.put_configmap("d", {"n": "d"}, namespace="team")


@pytest.mark.parametrize(
    ("namespace", "expected"), [(NS, ["default/a"]), ("team", ["team/c"]), (None, ["default/a", "team/c"])]
)
async def test_selector_lists_what_matches_in_one_namespace_or_all(
    fake_kube: FakeKube, kube: KubeClient, namespace: str | None, expected: list[str]
) -> None:
    put_routes(fake_kube)
    async with watching_selector(kube, Selector(namespace, labels="canary-proxy.io/route=true")) as watcher:
        first = await watcher.batch()
        await watcher.status("watching")
    assert sorted(first) == expected
    assert {kind for kind, _ in first.values()} == {"ADDED"}
    assert fake_kube.watch_queries[0]["labelSelector"] == "canary-proxy.io/route=true"


async def test_selector_events_carry_identity_annotations_and_creation(
    fake_kube: FakeKube, kube: KubeClient
) -> None:
    put_routes(fake_kube)
    events = watch_configmaps(kube, Selector(NS, labels="canary-proxy.io/route"), backoff=FAST)
    async with contextlib.aclosing(events):
        [event] = await anext(events)
    assert (event.namespace, event.name, event.data) == (NS, "a", {"n": "a"})
    assert (event.annotations, event.created) == ({"note": "x"}, "2024-01-01T00:00:00Z")


async def test_selector_yields_an_empty_first_list_then_each_change(
    fake_kube: FakeKube, kube: KubeClient
) -> None:
    async with watching_selector(kube, Selector(None, labels="canary-proxy.io/route")) as watcher:
        assert await watcher.batch() == {}  # the first list, though empty, is the whole state
        fake_kube.put_configmap("x", {"n": "0"})  # not selected: nothing
        fake_kube.put_configmap("a", {"n": "0"}, namespace="team", labels=ROUTE)
        assert await watcher.batch() == {"team/a": ("ADDED", {"n": "0"})}
        fake_kube.patch_configmap("a", {"n": "1"}, namespace="team")
        assert await watcher.batch() == {"team/a": ("MODIFIED", {"n": "1"})}
        fake_kube.put_configmap("a", {"n": "1"}, namespace="team", labels={})  # leaves the selection
        assert await watcher.batch() == {"team/a": ("DELETED", {})}
        fake_kube.put_configmap("x", {"n": "0"}, labels=ROUTE)  # joins it
        assert await watcher.batch() == {"default/x": ("ADDED", {"n": "0"})}
        fake_kube.delete_configmap("x")
        assert await watcher.batch() == {"default/x": ("DELETED", {})}


@pytest.mark.parametrize("as_http_status", [False, True], ids=["error-event", "http-410"])
async def test_selector_relist_reports_what_changed_meanwhile(
    fake_kube: FakeKube, kube: KubeClient, as_http_status: bool
) -> None:
    fake_kube.expire_with_http_status = as_http_status
    for name in ("gone", "kept", "changed"):
        fake_kube.put_configmap(name, {"n": "0"}, labels=ROUTE)
    async with watching_selector(kube, Selector(NS, labels="canary-proxy.io/route")) as watcher:
        assert len(await watcher.batch()) == 3
        await watcher.status("watching")
        assert fake_kube.cut_watches() == 1  # while it is away, then compaction:
        fake_kube.delete_configmap("gone")
        fake_kube.patch_configmap("changed", {"n": "1"})
        fake_kube.put_configmap("new", {"n": "0"}, labels=ROUTE)
        fake_kube.compact()
        await watcher.status("relisting")
        relisted = await watcher.batch()
    assert relisted == {  # one batch, and nothing about "kept"
        "default/gone": ("DELETED", {}),
        "default/changed": ("MODIFIED", {"n": "1"}),
        "default/new": ("ADDED", {"n": "0"}),
    }
    assert fake_kube.requests["list"] == 2


async def test_selector_relist_without_changes_yields_nothing(fake_kube: FakeKube, kube: KubeClient) -> None:
    put_routes(fake_kube)
    async with watching_selector(kube, Selector(None, labels="canary-proxy.io/route")) as watcher:
        await watcher.batch()
        await watcher.status("watching")
        fake_kube.put_configmap("b", {"n": "1"})  # not selected; then compaction past it
        fake_kube.compact()
        fake_kube.cut_watches()
        await watcher.status("relisting")
        await watcher.status("watching")
        fake_kube.patch_configmap("a", {"n": "1"})
        assert await watcher.batch() == {"default/a": ("MODIFIED", {"n": "1"})}  # the next one
    assert fake_kube.requests["list"] == 2


async def test_selector_yields_nothing_while_the_api_is_down(fake_kube: FakeKube, kube: KubeClient) -> None:
    put_routes(fake_kube)
    async with watching_selector(kube, Selector(None, labels="canary-proxy.io/route")) as watcher:
        assert len(await watcher.batch()) == 2
        await watcher.status("watching")
        await fake_kube.stop()
        fake_kube.delete_configmap("a")
        for _ in range(3):  # the cut, then failed reconnections
            retrying = await watcher.status("retrying")
        assert watcher.batches.empty()
        await fake_kube.start()
        assert await watcher.batch() == {"default/a": ("DELETED", {})}  # resumed, not relisted
    assert isinstance(retrying.error, Unreachable)
    assert fake_kube.requests["list"] == 1


# -- the fake itself ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("tier=web", ["web"]),
        ("tier==web,canary", ["web"]),
        ("tier!=web", ["api", "none"]),
        ("!canary", ["api", "none"]),
        ("tier in (web, api)", ["api", "web"]),
        ("tier notin (web),example.com/x", ["api"]),
    ],
)
async def test_fake_label_selectors(
    fake_kube: FakeKube, kube: KubeClient, selector: str, expected: list[str]
) -> None:
    fake_kube.put_configmap("web", {}, labels={"tier": "web", "canary": "1"})
    fake_kube.put_configmap("api", {}, labels={"tier": "api", "example.com/x": ""})
    fake_kube.put_configmap("none", {})
    objects, _ = await kube.list_configmaps(Selector(NS, labels=selector))
    assert sorted(cm.name for cm in objects) == expected


async def test_fake_rejects_a_malformed_label_selector(kube: KubeClient) -> None:
    with pytest.raises(KubeError) as caught:
        await kube.list_configmaps(Selector(NS, labels="tier in web"))
    assert (caught.value.status, caught.value.reason) == (400, "BadRequest")


@pytest.mark.parametrize(
    ("content_type", "patch"),
    [
        ("application/merge-patch+json", {"data": {"a": None, "b": "2"}}),
        ("application/strategic-merge-patch+json", {"data": {"a": None, "b": "2"}}),
        (
            "application/json-patch+json",
            [{"op": "remove", "path": "/data/a"}, {"op": "add", "path": "/data/b", "value": "2"}],
        ),
    ],
)
async def test_fake_patch_content_types(
    fake_kube: FakeKube, kube: KubeClient, content_type: str, patch: Any
) -> None:
    fake_kube.put_configmap("cfg", {"a": "1"})
    await kube._core.patch_namespaced_config_map("cfg", NS, patch, _content_type=content_type)
    assert fake_kube.configmap("cfg")["data"] == {"b": "2"}  # type: ignore[index]


async def test_fake_create_replace_delete(fake_kube: FakeKube, kube: KubeClient) -> None:
    from kubernetes.aio import client as models

    core = kube._core
    body = models.V1ConfigMap(metadata=models.V1ObjectMeta(name="cfg"), data={"a": "1"})
    created = await core.create_namespaced_config_map(NS, body)
    with pytest.raises(models.ApiException) as caught:
        await core.create_namespaced_config_map(NS, body)
    assert (caught.value.status, "AlreadyExists" in str(caught.value.body)) == (409, True)
    created.data = {"a": "2"}
    replaced = await core.replace_namespaced_config_map("cfg", NS, created)
    with pytest.raises(models.ApiException, match="409"):  # created's resourceVersion is stale now
        await core.replace_namespaced_config_map("cfg", NS, created)
    assert replaced.data == {"a": "2"}
    await core.delete_namespaced_config_map("cfg", NS)
    assert [e["type"] for e in fake_kube.list_objects("configmaps")] == []
    with pytest.raises(NotFound):
        await kube.get_configmap(NS, "cfg")


async def test_fake_control_endpoints(fake_kube: FakeKube) -> None:
    auth = {"Authorization": f"Bearer {fake_kube.token}"}
    async with aiohttp.ClientSession(fake_kube.url, headers=auth) as http:
        async with http.post("/_test/fail", json={"count": 1, "status": 503}) as response:
            assert response.status == 200
        async with http.get(f"/api/v1/namespaces/{NS}/configmaps") as response:
            assert (await response.json())["code"] == 503  # a Status body, as the API sends
        async with http.post("/_test/compact") as response:
            assert (await response.json())["compacted"] == fake_kube.resource_version
        async with http.get("/_test/requests") as response:
            assert await response.json() == {"list": 1}
