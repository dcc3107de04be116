"""``serve --ingress-class``: Ingress objects as routes, through the real proxy process and the
real Kubernetes client, against the fake API server.

The Argo Rollouts and Flagger tests replay, object by object, exactly what those controllers
write (tests/fixtures/ingress/*.json, taken from their source) while traffic runs: after each
write the data path follows within 1 s, and no request fails. The Services are pointed at
127.0.0.1 and the test backends' ports, as the issue says; nothing else in the objects changes.
"""

from __future__ import annotations

import asyncio
import copy
import json
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from .conftest import Backend, ProxyProcess, start_proxy, stop_proxy
from .fakekube import FakeKube
from .test_cli import cli

FIXTURES = Path(__file__).parent / "fixtures" / "ingress"
P = "nginx.ingress.kubernetes.io/"
PROMPT = 1.0  # seconds: the bound from a write to the traffic following it
CONCURRENCY = 4
PER_CLIENT = 20000  # requests at most per load client: bounded even if a wait hangs


async def serve_ingresses(
    fake: FakeKube, tmp_path: Path, *args: str, wait_ready: bool = True
) -> ProxyProcess:
    assert fake.kubeconfig is not None
    return await start_proxy(
        None, tmp_path, "--ingress-class", "--kubeconfig", str(fake.kubeconfig), "--access-log", "off",
        "--tls-listen", "127.0.0.1:0", *args,
        use_config=False, wait_ready=wait_ready,
    )  # fmt: skip


def service(
    name: str, backend: Backend, *, namespace: str = "default", port_name: str = "http"
) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": "127.0.0.1",
            "ports": [{"name": port_name, "port": backend.port, "protocol": "TCP"}],
        },
    }


def ingress(
    name: str,
    host: str,
    svc: str,
    port: int | str,
    *,
    namespace: str = "default",
    annotations: dict[str, str] | None = None,
    ingress_class: str = "canary-proxy",
    path: str = "/",
) -> dict[str, Any]:
    number_or_name = {"number": port} if isinstance(port, int) else {"name": port}
    backend = {"service": {"name": svc, "port": number_or_name}}
    rule = {"host": host, "http": {"paths": [{"path": path, "pathType": "Prefix", "backend": backend}]}}
    return {
        "metadata": {"name": name, "namespace": namespace, "annotations": annotations or {}},
        "spec": {"ingressClassName": ingress_class, "rules": [rule]},
    }


def localise(obj: dict[str, Any], ports: dict[str, int]) -> dict[str, Any]:
    """The object with every backend's Service port number replaced by the test port of
    that Service (the Services listen on the test backends' ports, not on 80)."""
    obj = copy.deepcopy(obj)

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            svc = node.get("service")
            if isinstance(svc, dict) and svc.get("name") in ports and "number" in (svc.get("port") or {}):
                svc["port"] = {"number": ports[svc["name"]]}
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(obj)
    return obj


async def ask(url: str, host: str, **kwargs: Any) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session,
        session.get(url + "/", headers={"Host": host, **kwargs.pop("headers", {})}, **kwargs) as r,
    ):
        await r.read()
        return r.status, r.headers.get("X-Backend", "")


async def answered(url: str, host: str, want: str | int, timeout: float = PROMPT, **kwargs: Any) -> None:
    """Within ``timeout``, ``host`` is answered by ``want`` (a backend's name or a status).
    The change happens inside the proxy process: polled, bounded."""
    async with asyncio.timeout(timeout):
        while True:
            if want in await ask(url, host, **kwargs):
                return
            await asyncio.sleep(0.01)


async def route_weight(proxy: ProxyProcess, name: str) -> int | None:
    document = await proxy.admin_json("/config")
    for route in document.get("routes", []):
        if route["name"] == name:
            return int(route["canary-weight"]) if route["canary-url"] != route["stable-url"] else None
    raise AssertionError(f"no route {name} in {document}")


async def weight_applied(proxy: ProxyProcess, name: str, weight: int | None) -> None:
    """Within the issue's 1 s, the data path serves ``name`` with this canary weight (None:
    no canary). /config shows what the data path serves, not what was last read."""
    async with asyncio.timeout(PROMPT):
        while True:
            if await route_weight(proxy, name) == weight:
                return
            await asyncio.sleep(0.01)


@dataclass
class Load:
    """Clients that each send requests one after another, without cookies (every request is
    a new user), until stopped; every answer that is not a 200 is a failure."""

    url: str
    host: str
    failures: list[str] = field(default_factory=list)
    served: Counter[str] = field(default_factory=Counter)  # per backend
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def client(self) -> None:
        async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
            for _ in range(PER_CLIENT):
                if self.stop.is_set():
                    return
                try:
                    async with session.get(self.url + "/load", headers={"Host": self.host}) as r:
                        await r.read()
                        if r.status != 200:
                            self.failures.append(f"{r.status}")
                        self.served[r.headers.get("X-Backend", "")] += 1
                except (aiohttp.ClientError, TimeoutError) as exc:
                    self.failures.append(repr(exc))


@pytest.fixture
async def load_on() -> AsyncIterator[Any]:
    running: list[tuple[Load, list[asyncio.Task[None]]]] = []

    def start(url: str, host: str) -> Load:
        load = Load(url, host)
        running.append((load, [asyncio.create_task(load.client()) for _ in range(CONCURRENCY)]))
        return load

    yield start
    for load, tasks in running:
        load.stop.set()
        await asyncio.gather(*tasks)


def replay_steps(name: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    fixture = json.loads((FIXTURES / name).read_text())
    return fixture["services"], fixture["steps"]


def apply_step(fake: FakeKube, step: dict[str, Any], ports: dict[str, int]) -> None:
    """One write, as the controller makes it: create/update a whole object, merge-patch, delete."""
    if step["verb"] in ("create", "update"):
        fake.put_object("ingresses", localise(step["object"], ports))
    elif step["verb"] == "patch":
        fake.patch_object("ingresses", step["name"], step["patch"], namespace=step["namespace"])
    else:
        assert step["verb"] == "delete"
        fake.delete_object("ingresses", step["name"], namespace=step["namespace"])


def point_services(
    fake: FakeKube, services: list[dict[str, Any]], backends: dict[str, Backend]
) -> dict[str, int]:
    """Each fixture Service at 127.0.0.1 and its test backend's port; returns name -> port."""
    for svc in services:
        local = copy.deepcopy(svc)
        backend = backends[svc["metadata"]["name"]]
        local["spec"]["clusterIP"], local["spec"]["clusterIPs"] = "127.0.0.1", ["127.0.0.1"]
        local["spec"]["ports"] = [{**local["spec"]["ports"][0], "port": backend.port}]
        fake.put_object("services", local)
    return {name: backend.port for name, backend in backends.items()}


async def test_argo_rollouts_steps_are_followed_under_load_with_no_failure(
    fake_kube: FakeKube, backends: tuple[Backend, Backend], tmp_path: Path, load_on: Any
) -> None:
    stable, canary = backends
    services, steps = replay_steps("argo-rollouts.json")
    ports = point_services(
        fake_kube, services, {"rollouts-demo-stable": stable, "rollouts-demo-canary": canary}
    )
    apply_step(fake_kube, steps[0], ports)  # the user's stable Ingress
    proxy = await serve_ingresses(fake_kube, tmp_path)
    route, host = "rollouts/rollouts-demo-stable", "rollouts-demo.local"
    try:
        await answered(proxy.url, host, stable.name, timeout=5)
        load = load_on(proxy.url, host)
        expected: list[int | None] = [0, 5, 25, 50, 100, 0, None]  # create, 4 patches, 0, delete
        for step, weight in zip(steps[1:], expected, strict=True):
            apply_step(fake_kube, step, ports)
            await weight_applied(proxy, route, weight)
            if weight == 100:
                await answered(proxy.url, host, canary.name)
                assert await ask(proxy.url, host) == (200, canary.name)
            elif weight in (0, None):
                await answered(proxy.url, host, stable.name)
                assert await ask(proxy.url, host) == (200, stable.name)
        load.stop.set()
        assert load.failures == [], load.failures[:5]
        assert load.served[stable.name] and load.served[canary.name], load.served
    finally:
        await stop_proxy(proxy)


async def test_flagger_ab_test_then_weight_steps_under_load_with_no_failure(
    fake_kube: FakeKube, four: list[Backend], tmp_path: Path, load_on: Any
) -> None:
    primary, canary = four[0], four[1]
    services, steps = replay_steps("flagger.json")
    by_name = {"podinfo": primary, "podinfo-canary": canary, "podinfo-primary": primary}
    ports = point_services(
        fake_kube, services, {s["metadata"]["name"]: by_name[s["metadata"]["name"]] for s in services}
    )
    apply_step(fake_kube, steps[0], ports)
    proxy = await serve_ingresses(fake_kube, tmp_path)
    route, host = "test/podinfo", "app.example.com"
    try:
        await answered(proxy.url, host, primary.name, timeout=5)
        load = load_on(proxy.url, host)
        apply_step(fake_kube, steps[1], ports)  # canary: "false" -- a conflicting main, reported
        apply_step(fake_kube, steps[2], ports)  # A/B: header x-canary: insider, cookie canary
        await answered(proxy.url, host, canary.name, headers={"x-canary": "insider"})
        await answered(proxy.url, host, canary.name, headers={"Cookie": "canary=always"})
        assert await ask(proxy.url, host, headers={"x-canary": "outsider"}) == (200, primary.name)
        assert await ask(proxy.url, host) == (200, primary.name)
        apply_step(fake_kube, steps[3], ports)  # promoted: the canary is switched off
        await answered(proxy.url, host, primary.name, headers={"x-canary": "insider"})
        for step, weight in zip(steps[4:9], (10, 20, 30, 40, 50), strict=True):
            apply_step(fake_kube, step, ports)
            await weight_applied(proxy, route, weight)
        apply_step(fake_kube, steps[9], ports)
        await weight_applied(proxy, route, None)
        load.stop.set()
        assert load.failures == [], load.failures[:5]
        assert load.served[canary.name] and load.served[primary.name], load.served
        document = await proxy.admin_json("/config")
        [report] = document["ingress"]["reported"]
        assert report["kind"] == "conflict" and report["ingress"] == "test/podinfo-canary", report
    finally:
        await stop_proxy(proxy)


async def test_only_the_class_is_served_services_resolve_live_and_notes_show(
    fake_kube: FakeKube, four: list[Backend], tmp_path: Path
) -> None:
    shop, shop2, blog, _ = four
    fake_kube.put_object("services", service("shop", shop, port_name="web"))
    fake_kube.put_object("services", service("blog", blog))
    fake_kube.put_object("ingresses", ingress("shop", "shop.example.com", "shop", "web"))  # a named port
    snippet = {P + "configuration-snippet": "return 200;", P + "proxy-read-timeout": "7"}
    fake_kube.put_object(
        "ingresses", ingress("blog", "blog.example.com", "blog", blog.port, annotations=snippet)
    )
    fake_kube.put_object(
        "ingresses", ingress("nginx", "other.example.com", "blog", blog.port, ingress_class="nginx")
    )
    proxy = await serve_ingresses(fake_kube, tmp_path)
    try:
        await answered(proxy.url, "shop.example.com", shop.name, timeout=5)
        await answered(proxy.url, "blog.example.com", blog.name)
        assert (await ask(proxy.url, "other.example.com"))[0] == 404, "another class's Ingress"

        # A Service change takes effect live: the named port now points elsewhere.
        fake_kube.put_object("services", service("shop", shop2, port_name="web"))
        await answered(proxy.url, "shop.example.com", shop2.name)

        # The legacy class annotation claims too; changing the class away releases it.
        legacy = ingress("nginx", "other.example.com", "blog", blog.port, ingress_class="")
        del legacy["spec"]["ingressClassName"]
        legacy["metadata"]["annotations"] = {"kubernetes.io/ingress.class": "canary-proxy"}
        fake_kube.put_object("ingresses", legacy)
        await answered(proxy.url, "other.example.com", blog.name)
        fake_kube.put_object(
            "ingresses", ingress("nginx", "other.example.com", "blog", blog.port, ingress_class="nginx")
        )
        await answered(proxy.url, "other.example.com", 404)

        document = await proxy.admin_json("/config")
        ignored = {(i["ingress"], i["annotation"]): i["reason"] for i in document["ingress"]["ignored"]}
        assert "security" in ignored[("default/blog", P + "configuration-snippet")]
        [blog_route] = [r for r in document["routes"] if r["name"] == "default/blog"]
        assert blog_route["upstream-timeout"] == "7s" and blog_route["ingress"]["service"] == "blog"
        logged = [e for e in proxy.logs if "configuration-snippet" in str(e.get("msg", ""))]
        assert len(logged) == 1, "listed once in the log, however often the routes rebuild"

        fake_kube.delete_object("ingresses", "blog")
        await answered(proxy.url, "blog.example.com", 404)
        assert (await ask(proxy.url, "shop.example.com"))[1] == shop2.name
    finally:
        await stop_proxy(proxy)


async def test_namespace_limits_what_is_served(
    fake_kube: FakeKube, four: list[Backend], tmp_path: Path
) -> None:
    mine, theirs = four[0], four[1]
    fake_kube.put_object("services", service("app", mine, namespace="team-a"))
    fake_kube.put_object("services", service("app", theirs, namespace="team-b"))
    fake_kube.put_object("ingresses", ingress("app", "a.example.com", "app", mine.port, namespace="team-a"))
    fake_kube.put_object("ingresses", ingress("app", "b.example.com", "app", theirs.port, namespace="team-b"))
    proxy = await serve_ingresses(fake_kube, tmp_path, "--namespace", "team-a")
    try:
        await answered(proxy.url, "a.example.com", mine.name, timeout=5)
        assert (await ask(proxy.url, "b.example.com"))[0] == 404
        assert fake_kube.watch_queries, "it watches"
    finally:
        await stop_proxy(proxy)


async def test_waits_for_the_api_and_is_not_ready_until_listed(
    fake_kube: FakeKube, backends: tuple[Backend, Backend], tmp_path: Path
) -> None:
    stable, _ = backends
    fake_kube.put_object("services", service("app", stable))
    fake_kube.put_object("ingresses", ingress("app", "app.example.com", "app", stable.port))
    await fake_kube.stop()  # the API is down at start-up: waited for, not fatal
    proxy = await serve_ingresses(fake_kube, tmp_path, wait_ready=False)
    try:
        await proxy.wait_log(lambda e: "waiting for a valid config" in str(e.get("msg", "")))
        await fake_kube.start()
        ready = await proxy.wait_log(lambda e: e.get("msg") == "ready", timeout=20)
        await answered("http://" + ready["public"], "app.example.com", stable.name, timeout=5)
    finally:
        await stop_proxy(proxy)


async def test_usage_errors(tmp_path: Path) -> None:
    for args, message in [
        (["--ingress-class", "--config", "x.yaml"], "exactly one of"),
        (
            ["--ingress-class", "--kubeconfig", str(tmp_path / "missing")],
            "cannot load Kubernetes client config",
        ),
        (["--config", "x.yaml", "--namespace", "a"], "--namespace goes with"),
    ]:
        result = await asyncio.to_thread(cli, "serve", *args)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)


async def test_workers_serve_ingress_routes_with_their_origin(
    fake_kube: FakeKube, backends: tuple[Backend, Backend], tmp_path: Path
) -> None:
    stable, canary = backends
    fake_kube.put_object("services", service("app", stable))
    fake_kube.put_object("services", service("app-canary", canary))
    fake_kube.put_object("ingresses", ingress("app", "app.example.com", "app", stable.port))
    proxy = await serve_ingresses(fake_kube, tmp_path, "--workers", "2")
    try:
        await answered(proxy.url, "app.example.com", stable.name, timeout=5)
        weighted = {P + "canary": "true", P + "canary-weight": "100"}
        fake_kube.put_object(
            "ingresses",
            ingress("app-canary", "app.example.com", "app-canary", canary.port, annotations=weighted),
        )
        await weight_applied(proxy, "default/app", 100)  # every worker applied it
        for _ in range(10):  # whichever worker takes the connection
            assert await ask(proxy.url, "app.example.com") == (200, canary.name)
        [route] = (await proxy.admin_json("/config"))["routes"]
        assert route["ingress"]["canary"] == f"default-app-canary-{canary.port}", route
    finally:
        await stop_proxy(proxy)


async def test_changes_made_while_the_watch_was_cut_and_compacted_are_relisted(
    fake_kube: FakeKube, backends: tuple[Backend, Backend], tmp_path: Path
) -> None:
    """The same loop as the ConfigMap watch: a cut stream is resumed, and a resourceVersion
    too old for the server (410) means a relist that finds what changed meanwhile."""
    stable, canary = backends
    fake_kube.put_object("services", service("app", stable))
    fake_kube.put_object("services", service("app-canary", canary))
    fake_kube.put_object("ingresses", ingress("app", "app.example.com", "app", stable.port))
    proxy = await serve_ingresses(fake_kube, tmp_path)
    try:
        await answered(proxy.url, "app.example.com", stable.name, timeout=5)
        lists = fake_kube.requests["list"]
        fake_kube.expire_with_http_status = True
        await fake_kube.stop()  # every watch is cut; changes happen while the API is away
        weighted = {P + "canary": "true", P + "canary-weight": "100"}
        fake_kube.put_object(
            "ingresses",
            ingress("app-canary", "app.example.com", "app-canary", canary.port, annotations=weighted),
        )
        fake_kube.compact()
        await fake_kube.start()
        await answered(proxy.url, "app.example.com", canary.name, timeout=5)
        assert fake_kube.requests["list"] > lists, "relisted after 410"
    finally:
        await stop_proxy(proxy)


async def post(url: str, host: str, body: bytes, *, chunked: bool = False) -> int:
    async def stream() -> AsyncIterator[bytes]:
        yield body

    async with (
        aiohttp.ClientSession() as session,
        session.post(url + "/upload", headers={"Host": host}, data=stream() if chunked else body) as r,
    ):
        await r.read()
        return r.status


async def test_proxy_body_size_is_each_routes_own_body_limit(
    fake_kube: FakeKube, backends: tuple[Backend, Backend], tmp_path: Path
) -> None:
    """ingress-nginx's proxy-body-size is the route's client_max_body_size: 413 beyond it
    (declared or chunked), "0" lifts the proxy's own --max-body-size, and routes without it
    keep that one."""
    stable, _ = backends
    fake_kube.put_object("services", service("app", stable))
    small = {P + "proxy-body-size": "1k"}
    fake_kube.put_object(
        "ingresses", ingress("small", "small.example.com", "app", stable.port, annotations=small)
    )
    unlimited = {P + "proxy-body-size": "0"}
    fake_kube.put_object(
        "ingresses", ingress("big", "big.example.com", "app", stable.port, annotations=unlimited)
    )
    fake_kube.put_object("ingresses", ingress("plain", "plain.example.com", "app", stable.port))
    proxy = await serve_ingresses(fake_kube, tmp_path, "--max-body-size", "2KiB")
    try:
        await answered(proxy.url, "plain.example.com", stable.name, timeout=5)
        assert await post(proxy.url, "small.example.com", b"x" * 1024) == 200
        assert await post(proxy.url, "small.example.com", b"x" * 1025) == 413
        assert await post(proxy.url, "small.example.com", b"x" * 1500, chunked=True) == 413
        assert await post(proxy.url, "big.example.com", b"x" * 65536) == 200
        assert await post(proxy.url, "big.example.com", b"x" * 65536, chunked=True) == 200
        assert await post(proxy.url, "plain.example.com", b"x" * 2048) == 200
        assert await post(proxy.url, "plain.example.com", b"x" * 2049) == 413
    finally:
        await stop_proxy(proxy)
