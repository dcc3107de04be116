"""Ingress status: the addresses as tables, then the writer against the fake API server."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from canary_proxy.ingress_status import (
    PublishAddress,
    PublishService,
    StatusWriter,
    ingress_addresses,
    parse_publish_address,
    service_addresses,
    with_addresses,
)
from canary_proxy.k8s import Backoff, KubeClient, load_config
from canary_proxy.k8s.lease import LeaseRef, LeaseTiming
from tests.conftest import Backend, ProxyProcess, start_proxy, stop_proxy
from tests.fakekube import FakeKube
from tests.scrape import eventually
from tests.test_cli import cli
from tests.test_ingress_mode import answered
from tests.test_ingress_mode import service as app_service

SHORT = LeaseTiming(lease_duration=2.0, renew_deadline=1.0, retry_period=0.2)
FAST = Backoff(base=0.01, cap=0.05)
REF = LeaseRef("default", "canary-proxy-leader-canary-proxy")
WAIT = 10.0


# -- addresses -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("203.0.113.7", (("", "203.0.113.7"),)),
        ("2001:db8::1", (("", "2001:db8::1"),)),
        ("LB.example.com", (("lb.example.com", ""),)),
        # ingress-nginx's order: hostname first, an entry without one ("") before
        (
            "lb.example.com, 203.0.113.7,198.51.100.1",
            (("", "198.51.100.1"), ("", "203.0.113.7"), ("lb.example.com", "")),
        ),
    ],
)
def test_publish_address(text: str, want: tuple[tuple[str, str], ...]) -> None:
    assert parse_publish_address(text) == want


@pytest.mark.parametrize("text", ["", " , ", "not a host!", "-bad.example.com", "http://lb.example.com"])
def test_publish_address_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_publish_address(text)


def svc(kind: str, *, lb: list[dict[str, str]] | None = None, **spec: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {"spec": {"type": kind, "clusterIP": "10.0.0.9", **spec}}
    if lb is not None:
        obj["status"] = {"loadBalancer": {"ingress": lb}}
    return obj


@pytest.mark.parametrize(
    ("service", "want"),
    [
        (svc("LoadBalancer", lb=[{"ip": "203.0.113.7"}]), (("", "203.0.113.7"),)),
        (svc("LoadBalancer", lb=[{"hostname": "a.elb.amazonaws.com"}]), (("a.elb.amazonaws.com", ""),)),
        (svc("LoadBalancer", lb=[{"hostname": "h", "ip": "1.2.3.4"}]), (("h", "1.2.3.4"),)),
        # not provisioned yet: no address (so the Ingresses say none either)
        (svc("LoadBalancer"), ()),
        # externalIPs are added, unless the balancer names them already
        (
            svc("LoadBalancer", lb=[{"ip": "1.2.3.4"}], externalIPs=["1.2.3.4", "5.6.7.8"]),
            (("", "1.2.3.4"), ("", "5.6.7.8")),
        ),
        (svc("NodePort"), (("", "10.0.0.9"),)),
        (svc("NodePort", externalIPs=["5.6.7.8"]), (("", "5.6.7.8"),)),
        (svc("ClusterIP"), (("", "10.0.0.9"),)),
        (svc("ClusterIP", clusterIP="None"), ()),  # headless
        ({"spec": {"type": "ExternalName", "externalName": "lb.example.com"}}, (("lb.example.com", ""),)),
        (svc("Unheard"), None),
    ],
    ids=[
        "lb-ip", "lb-hostname", "lb-both", "lb-pending", "lb-external-ips",
        "nodeport", "nodeport-external-ips", "clusterip", "headless", "externalname", "unknown",
    ],
)  # fmt: skip
def test_service_addresses_as_ingress_nginx(service: dict[str, Any], want: Any) -> None:
    assert service_addresses(service) == want


def test_with_addresses_sets_the_list_and_keeps_the_rest() -> None:
    ingress = {"metadata": {"name": "a"}, "spec": {"rules": []}, "status": {"loadBalancer": {}}}
    written = with_addresses(ingress, (("", "1.2.3.4"), ("lb.example.com", "")))
    assert written["status"] == {
        "loadBalancer": {"ingress": [{"ip": "1.2.3.4"}, {"hostname": "lb.example.com"}]}
    }
    assert written["spec"] == ingress["spec"] and ingress["status"] == {"loadBalancer": {}}  # a copy
    assert with_addresses(written, ())["status"] == {"loadBalancer": {}}


def test_comparison_ignores_order_and_ports() -> None:
    one = {
        "status": {
            "loadBalancer": {"ingress": [{"hostname": "h"}, {"ip": "1.2.3.4", "ports": [{"port": 80}]}]}
        }
    }
    two = {"status": {"loadBalancer": {"ingress": [{"ip": "1.2.3.4"}, {"hostname": "h"}]}}}
    assert ingress_addresses(one) == ingress_addresses(two) == (("", "1.2.3.4"), ("h", ""))
    assert ingress_addresses({}) == ()


# -- the writer ----------------------------------------------------------------------------------


def ingress(
    name: str, *, namespace: str = "default", status: list[dict[str, str]] | None = None, host: str = ""
) -> dict[str, Any]:
    """A claimed Ingress: to the Service "app" (port "http"), for ``host`` or as the default."""
    backend = {"service": {"name": "app", "port": {"name": "http"}}}
    spec: dict[str, Any] = {"ingressClassName": "canary-proxy", "defaultBackend": backend}
    if host:
        path = {"path": "/", "pathType": "Prefix", "backend": backend}
        spec = {"ingressClassName": "canary-proxy", "rules": [{"host": host, "http": {"paths": [path]}}]}
    obj: dict[str, Any] = {"metadata": {"name": name, "namespace": namespace}, "spec": spec}
    if status is not None:
        obj["status"] = {"loadBalancer": {"ingress": status}}
    return obj


def lb_service(name: str = "lb", ips: list[str] | None = None) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"type": "LoadBalancer", "clusterIP": "10.0.0.9", "ports": [{"port": 80}]},
    }
    if ips is not None:
        obj["status"] = {"loadBalancer": {"ingress": [{"ip": ip} for ip in ips]}}
    return obj


def status_of(fake: FakeKube, name: str, namespace: str = "default") -> list[dict[str, str]] | None:
    obj = fake.get_object("ingresses", name, namespace=namespace) or {}
    if "status" not in obj:
        return None
    return list(((obj["status"] or {}).get("loadBalancer") or {}).get("ingress") or [])


Start = Callable[..., Awaitable[tuple[StatusWriter, asyncio.Task[None]]]]


@pytest.fixture
async def start(fake_kube: FakeKube) -> AsyncIterator[Start]:
    """Start a writer on its own client (a replica of its own); stopped at the end."""
    assert fake_kube.kubeconfig is not None
    config = await load_config(fake_kube.kubeconfig)
    stack = contextlib.AsyncExitStack()
    tasks: list[asyncio.Task[None]] = []

    async def start(
        publish: Any, claimed: set[tuple[str, str]], **options: Any
    ) -> tuple[StatusWriter, asyncio.Task[None]]:
        client = await stack.enter_async_context(KubeClient(config, backoff=FAST))
        options = {
            "timing": SHORT,
            "rewrite_backoff": Backoff(base=0.2, cap=1.0),
            "watch_backoff": FAST,
        } | options
        writer = StatusWriter(publish=publish, lease=REF, **options)
        writer.claimed(frozenset(claimed))
        task = asyncio.create_task(writer.run(client))
        tasks.append(task)
        return writer, task

    async with stack:
        yield start
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


IP = [{"ip": "203.0.113.7"}]


async def test_claimed_ingresses_get_the_address_and_others_are_untouched(
    fake_kube: FakeKube, start: Start
) -> None:
    fake_kube.put_object("ingresses", ingress("web"))
    fake_kube.put_object("ingresses", ingress("other", status=[{"ip": "192.0.2.1"}]))
    writer, _ = await start(PublishAddress(parse_publish_address("203.0.113.7")), {("default", "web")})
    await eventually(lambda: status_of(fake_kube, "web") == IP, timeout=WAIT, what="web's status")
    assert status_of(fake_kube, "other") == [{"ip": "192.0.2.1"}]

    # A newly claimed Ingress is written too; one claimed already right is not.
    fake_kube.put_object("ingresses", ingress("new"))
    fake_kube.put_object("ingresses", ingress("right", status=IP))
    version = fake_kube.get_object("ingresses", "right")["metadata"]["resourceVersion"]  # type: ignore[index]
    writer.claimed(frozenset({("default", "web"), ("default", "new"), ("default", "right")}))
    await eventually(lambda: writer.writes == 2, timeout=WAIT, what="new's status")
    assert status_of(fake_kube, "new") == IP
    assert fake_kube.get_object("ingresses", "right")["metadata"]["resourceVersion"] == version  # type: ignore[index]
    assert writer.writes == 2


async def test_it_writes_only_when_different(fake_kube: FakeKube, start: Start) -> None:
    fake_kube.put_object("ingresses", ingress("web"))
    writer, _ = await start(PublishAddress(parse_publish_address("203.0.113.7")), {("default", "web")})
    await eventually(lambda: writer.writes == 1, timeout=WAIT, what="the first write")
    # Changes that leave the address as it is: the spec, the claimed set, other Ingresses.
    relabelled = ingress("web")
    relabelled["metadata"]["labels"] = {"team": "a"}
    version = fake_kube.put_object("ingresses", relabelled)["metadata"]["resourceVersion"]
    fake_kube.put_object("ingresses", ingress("unclaimed"))
    writer.claimed(frozenset({("default", "web"), ("default", "gone")}))
    # Proof that the writer is alive and has had time to see it all: the Lease is renewed.
    renewals = fake_kube.requests["update"]
    await eventually(lambda: fake_kube.requests["update"] >= renewals + 3, timeout=WAIT, what="renewals")
    assert writer.writes == 1
    assert fake_kube.get_object("ingresses", "web")["metadata"]["resourceVersion"] == version  # type: ignore[index]
    assert status_of(fake_kube, "unclaimed") is None


async def test_a_status_overwritten_by_someone_else_is_written_back_with_backoff(
    fake_kube: FakeKube, start: Start
) -> None:
    fake_kube.put_object("ingresses", ingress("web"))
    writer, _ = await start(PublishAddress(parse_publish_address("203.0.113.7")), {("default", "web")})
    await eventually(lambda: status_of(fake_kube, "web") == IP, timeout=WAIT, what="written")
    await eventually(lambda: writer.writes == 1, timeout=WAIT, what="the write answered")
    for fight in range(3):  # a fight: each overwrite is answered, never in a tight loop
        fake_kube.patch_object(
            "ingresses", "web", {"status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.1"}]}}}
        )
        await eventually(lambda: writer.writes == 2 + fight, timeout=WAIT, what="written back")  # noqa: B023 -- awaited here
        assert status_of(fake_kube, "web") == IP


async def test_a_conflict_is_read_again_and_retried(fake_kube: FakeKube, start: Start) -> None:
    fake_kube.put_object("ingresses", ingress("web"))
    fake_kube.fail_next(1, status=409, verb="update", resource="ingresses")  # the first status write
    await start(PublishAddress(parse_publish_address("203.0.113.7")), {("default", "web")})
    await eventually(
        lambda: status_of(fake_kube, "web") == IP, timeout=WAIT, what="written after the conflict"
    )
    assert fake_kube.responses[409] == 1 and not fake_kube._failures


async def test_the_publish_service_is_followed_live(fake_kube: FakeKube, start: Start) -> None:
    fake_kube.put_object("ingresses", ingress("web"))
    writer, _ = await start(PublishService("default", "lb"), {("default", "web")})
    await eventually(lambda: writer.is_leader, timeout=WAIT, what="leading")
    # No Service yet: nothing is written (nor cleared).
    fake_kube.put_object("services", lb_service())  # pending: no address yet, none written
    await eventually(lambda: fake_kube.requests["update"] >= 3, timeout=WAIT, what="renewals")
    assert status_of(fake_kube, "web") is None
    fake_kube.put_object("services", lb_service(ips=["203.0.113.7"]))
    await eventually(lambda: status_of(fake_kube, "web") == IP, timeout=WAIT, what="the balancer's IP")
    fake_kube.put_object("services", lb_service(ips=["198.51.100.2", "203.0.113.7"]))
    await eventually(
        lambda: status_of(fake_kube, "web") == [{"ip": "198.51.100.2"}, *IP], timeout=WAIT, what="both IPs"
    )
    fake_kube.delete_object("services", "lb")  # gone: the status stays as it was
    fake_kube.put_object("ingresses", ingress("web2"))
    writer.claimed(frozenset({("default", "web"), ("default", "web2")}))
    renewals = fake_kube.requests["update"]
    await eventually(lambda: fake_kube.requests["update"] >= renewals + 3, timeout=WAIT, what="renewals")
    assert (
        status_of(fake_kube, "web") == [{"ip": "198.51.100.2"}, *IP] and status_of(fake_kube, "web2") is None
    )


async def test_clear_on_shutdown_empties_what_it_wrote(fake_kube: FakeKube, start: Start) -> None:
    fake_kube.put_object("ingresses", ingress("web"))
    fake_kube.put_object("ingresses", ingress("theirs", status=[{"ip": "192.0.2.1"}]))
    claimed = {("default", "web"), ("default", "theirs")}
    publish = PublishAddress(parse_publish_address("203.0.113.7"))
    _, task = await start(publish, claimed, clear_on_shutdown=True)
    await eventually(
        lambda: status_of(fake_kube, "web") == IP and status_of(fake_kube, "theirs") == IP, timeout=WAIT
    )
    fake_kube.patch_object(
        "ingresses", "theirs", {"status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.1"}]}}}
    )
    task.cancel()  # stopped before writing "theirs" back (the rewrite backoff): not ours, kept
    await asyncio.gather(task, return_exceptions=True)
    assert status_of(fake_kube, "web") == []
    assert status_of(fake_kube, "theirs") == [{"ip": "192.0.2.1"}]
    assert fake_kube.get_object("leases", REF.name)["spec"]["holderIdentity"] == ""  # type: ignore[index]


async def test_two_replicas_one_writer_and_a_failover(fake_kube: FakeKube, start: Start) -> None:
    fake_kube.put_object("ingresses", ingress("web"))
    fake_kube.put_object("services", lb_service(ips=["203.0.113.7"]))
    replicas = {}
    for _ in range(2):
        writer, task = await start(PublishService("default", "lb"), {("default", "web")})
        replicas[writer.identity] = (writer, task)
    await eventually(lambda: sum(w.writes for w, _ in replicas.values()) == 1, timeout=WAIT, what="written")
    assert status_of(fake_kube, "web") == IP
    holder = fake_kube.get_object("leases", REF.name)["spec"]["holderIdentity"]  # type: ignore[index]
    (leader, leader_task), [(other, _)] = replicas[holder], [r for k, r in replicas.items() if k != holder]
    assert leader.is_leader and not other.is_leader
    assert (leader.writes, other.writes) == (1, 0)

    leader_task.cancel()
    await asyncio.gather(leader_task, return_exceptions=True)
    fake_kube.put_object("services", lb_service(ips=["198.51.100.2"]))
    await eventually(
        lambda: other.writes == 1, timeout=SHORT.lease_duration + 2, what="the new leader writes"
    )
    assert status_of(fake_kube, "web") == [{"ip": "198.51.100.2"}]
    assert other.is_leader and leader.writes == 1


# -- real serve processes ------------------------------------------------------------------------

ELECTION = (
    "--leader-elect-lease-duration", "2s", "--leader-elect-renew-deadline", "1s",
    "--leader-elect-retry-period", "200ms",
)  # fmt: skip
LEASE = 2.0  # seconds: --leader-elect-lease-duration above


def lease_holder(fake: FakeKube) -> str:
    obj = fake.get_object("leases", REF.name) or {}
    return str(obj.get("spec", {}).get("holderIdentity") or "")


async def test_two_serve_replicas_one_writer_and_failover_on_kill_and_on_stop(
    fake_kube: FakeKube, backends: tuple[Backend, Backend], tmp_path: Path
) -> None:
    """The issue's test: two replicas serve, one holds the Lease and writes the status; when
    it is killed (no release) another takes over once the Lease expires, and when it stops
    cleanly (released) at the next attempt."""
    stable, _ = backends
    fake_kube.put_object("services", app_service("app", stable))
    fake_kube.put_object("ingresses", ingress("web", host="web.example.com"))
    fake_kube.put_object("services", lb_service(ips=["203.0.113.7"]))
    replicas: dict[str, ProxyProcess] = {}

    async def replica(name: str) -> ProxyProcess:
        proxy = await start_proxy(
            None, tmp_path, "--ingress-class", "--kubeconfig", str(fake_kube.kubeconfig),
            "--access-log", "off", "--tls-listen", "127.0.0.1:0", "--publish-service", "default/lb",
            *ELECTION,
            use_config=False, env={"HOSTNAME": name},
        )  # fmt: skip
        replicas[name] = proxy
        return proxy

    def leader() -> str:
        return lease_holder(fake_kube).partition("_")[0]

    def writers() -> set[str]:
        return {
            n for n, p in replicas.items() if any("status: default/web" in str(e.get("msg")) for e in p.logs)
        }

    try:
        for name in ("a", "b"):
            await replica(name)
        for proxy in replicas.values():  # all replicas serve
            await answered(proxy.url, "web.example.com", stable.name, timeout=5)
        await eventually(lambda: status_of(fake_kube, "web") == IP, timeout=WAIT, what="the status written")
        first = leader()
        await replicas[first].wait_log(lambda e: "status: default/web" in str(e.get("msg")), timeout=5)
        assert writers() == {first}, "only the leader writes"

        # kill -9: the Lease is not released; the other takes over once it expires.
        killed = time.monotonic()
        await stop_proxy(replicas[first])
        second = "b" if first == "a" else "a"
        await eventually(lambda: leader() == second, timeout=LEASE + 3, what="takeover after kill -9")
        assert time.monotonic() - killed < LEASE + 1.5
        fake_kube.put_object("services", lb_service(ips=["198.51.100.2"]))
        await eventually(
            lambda: status_of(fake_kube, "web") == [{"ip": "198.51.100.2"}],
            timeout=WAIT,
            what="the new leader writes",
        )
        await replicas[second].wait_log(lambda e: "status: default/web" in str(e.get("msg")), timeout=5)
        assert writers() == {first, second}  # the killed one, then this one

        # A clean stop releases the Lease: a third replica takes over at its next attempt.
        await replica("c")
        stopping = time.monotonic()
        assert await replicas[second].terminate() == 0  # every log line read by then
        assert any(str(e.get("msg", "")).endswith(": released") for e in replicas[second].logs)
        await eventually(lambda: leader() == "c", timeout=LEASE, what="takeover after a clean stop")
        assert time.monotonic() - stopping < LEASE
        fake_kube.put_object("services", lb_service(ips=["192.0.2.9"]))
        await eventually(
            lambda: status_of(fake_kube, "web") == [{"ip": "192.0.2.9"}], timeout=WAIT, what="c writes"
        )
    finally:
        for proxy in replicas.values():
            await stop_proxy(proxy)


async def test_usage_errors(fake_kube: FakeKube) -> None:
    kube = ["--ingress-class", "--kubeconfig", str(fake_kube.kubeconfig)]
    for args, message in [
        (["--config", "x.yaml", "--publish-address", "1.2.3.4"], "go with --ingress-class"),
        ([*kube, "--publish-address", "1.2.3.4", "--publish-service", "lb"], "exclude each other"),
        ([*kube, "--publish-address", "not an address!"], "--publish-address: invalid value"),
        ([*kube, "--publish-service", "a/b/c"], "--publish-service"),
        ([*kube, "--publish-service", "lb", "--election-id", "ns/lease"], "the proxy's own namespace"),
        ([*kube, "--publish-service", "lb", "--leader-elect-renew-deadline", "20s"], "longer than the renew"),
    ]:
        result = await asyncio.to_thread(cli, "serve", *args)  # the fake API stays served meanwhile
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
