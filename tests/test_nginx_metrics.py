"""ingress-nginx-compatible metrics for routes read from an Ingress, judged as Flagger judges
them: a real Prometheus scrapes a real proxy and evaluates Flagger's built-in nginx queries."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry, multiprocess

from canary_proxy.address import Address
from canary_proxy.metrics import NGINX_BUCKETS, Metrics, exposition
from canary_proxy.proxy.server import ProxyServer
from canary_proxy.routes import PREFIX, Origin, Route, parse_route
from canary_proxy.serve.public import serve_public

from .conftest import stop_proxy
from .fakekube import FakeKube
from .rollouts import metrics_page
from .scrape import wait_metric
from .test_ingress_mode import P, ingress, route_weight, serve_ingresses, service
from .test_rollout_prometheus import run_prometheus

HOST = "shop.example.com"
CANARY_UPSTREAM = "shop-web-canary-80"  # NAMESPACE-SERVICE-PORT, as ingress-nginx names it
ORIGIN = Origin("shop", "web", "web", HOST, "/", canary=CANARY_UPSTREAM)

# Flagger's built-in nginx checks (pkg/metrics/observers/nginx.go), verbatim: since 1.38 the
# latency is the response-duration histogram's mean (fluxcd/flagger#1686); from 1.15 to 1.37
# it was the upstream-latency summary's. Both count only the canary (``canary!=""``, since
# 1.15: fluxcd/flagger#1023). Whitespace is the observer's; PromQL ignores it anyway.
SUCCESS_RATE = """
	sum(
		rate(
			nginx_ingress_controller_requests{
				namespace="{{ namespace }}",
				ingress="{{ ingress }}",
				canary!="",
				status!~"5.*"
			}[{{ interval }}]
		)
	) 
	/ 
	sum(
		rate(
			nginx_ingress_controller_requests{
				namespace="{{ namespace }}",
				ingress="{{ ingress }}",
				canary!=""
			}[{{ interval }}]
		)
	) 
	* 100"""  # noqa: W291 (Flagger's trailing spaces)
DURATION = """
	sum(
		rate(
			nginx_ingress_controller_response_duration_seconds_sum{
				namespace="{{ namespace }}",
				ingress="{{ ingress }}",
				canary!=""
			}[{{ interval }}]
		)
	) 
	/ 
	sum(
		rate(
			nginx_ingress_controller_response_duration_seconds_count{
				namespace="{{ namespace }}",
				ingress="{{ ingress }}",
				canary!=""
			}[{{ interval }}]
		)
	) 
	* 1000"""  # noqa: W291
OLD_DURATION = DURATION.replace("response_duration_seconds", "ingress_upstream_latency_seconds")


def render(query: str, *, namespace: str, ingress: str, interval: str) -> str:
    """As Flagger's RenderQuery fills its template: the Canary's namespace, its ingressRef's
    name (the main Ingress) and the metric's interval."""
    values = {"namespace": namespace, "ingress": ingress, "interval": interval}
    rendered = re.sub(r"\{\{ (\w+) \}\}", lambda m: values[m.group(1)], query)
    assert "{{" not in rendered
    return rendered


@dataclass
class Flaky:
    """A backend whose every 10th request (the 10th, 20th, ...) answers 503: a fixed share,
    whatever the order requests arrive in. Every answer comes after ``delay``."""

    delay: float
    every: int = 0  # 0: never fails
    hits: int = 0
    url: str = ""
    port: int = 0
    runner: web.AppRunner | None = field(default=None, repr=False)

    async def handle(self, request: web.Request) -> web.Response:
        self.hits += 1
        failing = self.every and self.hits % self.every == 0
        await asyncio.sleep(self.delay)
        return web.Response(status=503 if failing else 200, text="failing\n" if failing else "ok\n")


@contextlib.asynccontextmanager
async def flaky(delay: float, every: int = 0) -> AsyncIterator[Flaky]:
    backend = Flaky(delay, every)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", backend.handle)
    backend.runner = web.AppRunner(app, access_log=None)
    await backend.runner.setup()
    await web.TCPSite(backend.runner, "127.0.0.1", 0).start()
    backend.port = backend.runner.addresses[0][1]
    backend.url = f"http://127.0.0.1:{backend.port}"
    try:
        yield backend
    finally:
        await backend.runner.cleanup()


def ingress_route(name: str, stable: str, canary: str, origin: Origin | None, *, host: str = HOST) -> Route:
    """A route as Ingress mode builds it (``origin`` set), or as a file would (None)."""
    raw = {"stable-url": stable, "canary-url": canary, "canary-by-header": "X-Canary"}
    route = parse_route({**raw, "host": host}, name=name)
    return Route(route.name, route.host, route.path, PREFIX, route.config, origin=origin)


@dataclass
class Running:
    url: str  # the public port
    target: str  # HOST:PORT of /metrics
    registry: CollectorRegistry


@contextlib.asynccontextmanager
async def serving(routes: Sequence[Route], *, nginx: bool = True) -> AsyncIterator[Running]:
    """The proxy's data path in this loop on a real port, and its /metrics page as the admin
    port writes it (``exposition``)."""
    registry = CollectorRegistry()
    metrics = Metrics(registry, nginx=nginx)
    metrics.init_data_plane(route=None)
    proxy = ProxyServer(metrics=metrics, access_log=None)
    proxy.apply_routes(routes)
    public = await serve_public(proxy, Address("127.0.0.1", 0))
    try:
        async with metrics_page(registry) as port:
            yield Running(f"http://{public.address}", f"127.0.0.1:{port}", registry)
    finally:
        public.server.close()
        await proxy.close()
        await public.server.wait_closed()


async def send(url: str, count: int, *, version: str, host: str = HOST, concurrency: int = 20) -> list[int]:
    """``count`` requests forced to ``version`` (by header), ``concurrency`` at a time."""
    header = {"X-Canary": "always" if version == "canary" else "never", "Host": host}
    statuses: list[int] = []
    left = iter(range(count))

    async def user(session: aiohttp.ClientSession) -> None:
        for _ in left:
            async with session.get(url + "/", headers=header) as response:
                await response.read()
                statuses.append(response.status)

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(user(session) for _ in range(concurrency)))
    return statuses


def page_lines(text: str, family: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(family)]


async def promtool_complaints(text: str) -> list[str]:
    """``promtool check metrics`` on a page: it must parse it (exit 0, or 3 for lint
    complaints only); the complaints, one per line."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool not found on PATH: install Debian's 'prometheus' package (scripts/bootstrap)")
    proc = await asyncio.create_subprocess_exec(
        promtool, "check", "metrics",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(text.encode()), 30)
    assert proc.returncode in (0, 3), out.decode()
    return out.decode().splitlines()


# -- the families, as ingress-nginx writes them --------------------------------------------------


async def test_labels_types_and_buckets_are_ingress_nginxs() -> None:
    async with flaky(0.0) as stable, flaky(0.0, every=2) as canary:
        routes = [ingress_route("shop/web", stable.url, canary.url, ORIGIN)]
        async with serving(routes) as proxy:
            assert await send(proxy.url, 2, version="stable", concurrency=1) == [200, 200]
            assert sorted(await send(proxy.url, 2, version="canary", concurrency=1)) == [200, 503]
            async with aiohttp.ClientSession() as session:
                async with session.get(f"http://{proxy.target}/metrics") as r:
                    text = await r.text()

    assert "# TYPE nginx_ingress_controller_requests counter" in text
    assert "# TYPE nginx_ingress_controller_response_duration_seconds histogram" in text
    assert "# TYPE nginx_ingress_controller_ingress_upstream_latency_seconds summary" in text
    common = f'host="{HOST}",ingress="web",method="GET",namespace="shop",path="/",service="web"'
    assert sorted(page_lines(text, "nginx_ingress_controller_requests")) == [
        f'nginx_ingress_controller_requests{{canary="",{common},status="200"}} 2.0',
        f'nginx_ingress_controller_requests{{canary="{CANARY_UPSTREAM}",{common},status="200"}} 1.0',
        f'nginx_ingress_controller_requests{{canary="{CANARY_UPSTREAM}",{common},status="503"}} 1.0',
    ]
    bounds = [
        float(m.group(1))
        for m in re.finditer(r'_bucket\{canary="",[^}]*le="([^"]+)"', text)
        if m.group(1) != "+Inf"
    ]
    assert tuple(bounds) == NGINX_BUCKETS == (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
    assert await promtool_complaints(text) == [
        'nginx_ingress_controller_requests counter metrics should have "_total" suffix'  # as ingress-nginx's
    ]
    latency = page_lines(text, "nginx_ingress_controller_ingress_upstream_latency_seconds_count")
    assert sorted(latency) == [
        'nginx_ingress_controller_ingress_upstream_latency_seconds_count{canary="",ingress="web",'
        'namespace="shop",service="web"} 2.0',
        f'nginx_ingress_controller_ingress_upstream_latency_seconds_count{{canary="{CANARY_UPSTREAM}",'
        'ingress="web",namespace="shop",service="web"} 2.0',
    ]


async def test_only_routes_from_an_ingress_have_them_and_only_when_on() -> None:
    async with flaky(0.0) as stable, flaky(0.0) as canary:
        routes = [
            ingress_route("shop/web", stable.url, canary.url, ORIGIN),
            ingress_route("blog", stable.url, canary.url, None, host="blog.example.com"),
        ]
        async with serving(routes) as on, serving(routes, nginx=False) as off:
            for proxy in (on, off):
                await send(proxy.url, 3, version="canary", host="blog.example.com", concurrency=1)
            on_page = exposition(on.registry).decode()
            assert not page_lines(on_page, "nginx_ingress_controller")  # none for the file route
            for proxy in (on, off):
                await send(proxy.url, 1, version="canary", concurrency=1)
            on_page, off_page = exposition(on.registry).decode(), exposition(off.registry).decode()
    assert len(page_lines(on_page, "nginx_ingress_controller_requests{")) == 1
    assert "nginx_ingress_controller" not in off_page
    own = 'canary_proxy_requests_total{{code="200",method="GET",route="{}",version="canary"}} {}'
    for page in (on_page, off_page):  # canary-proxy's own metrics stay as they are
        assert own.format("blog", 3.0) in page and own.format("shop/web", 1.0) in page


# -- Flagger's checks, evaluated by a real Prometheus -------------------------------------------


@dataclass
class Prom:
    url: str
    session: aiohttp.ClientSession

    async def query(self, promql: str, at: float) -> list[dict[str, Any]]:
        params = {"query": promql, "time": f"{at:.3f}"}
        async with self.session.get(self.url + "/api/v1/query", params=params) as r:
            body = await r.json()
        assert body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    async def scalar(self, promql: str, at: float) -> float:
        result = await self.query(promql, at)
        assert len(result) == 1, (promql, result)
        return float(result[0]["value"][1])

    async def scrape_after(self, moment: float, timeout: float = 15) -> float:
        """The time of the first scrape that began after ``moment`` (wall clock, as Prometheus
        stamps its samples), once Prometheus has stored it."""
        deadline = time.monotonic() + timeout
        while True:
            result = await self.query("up[30s]", time.time())
            stamps = [float(t) for t, _ in result[0]["values"]] if result else []
            later = [t for t in stamps if t > moment]
            if later:
                return min(later)
            assert time.monotonic() < deadline, f"no scrape after {moment} in {timeout}s: {stamps[-3:]}"
            await asyncio.sleep(0.2)


async def counted(registry: CollectorRegistry, total: int, timeout: float = 5) -> None:
    """Until the proxy has accounted ``total`` requests in all (it does so just after each
    response is written)."""
    deadline = time.monotonic() + timeout
    while True:
        seen = sum(
            s.value
            for metric in registry.collect()
            if metric.name == "canary_proxy_requests"
            for s in metric.samples
            if s.name.endswith("_total")
        )
        if seen == total:
            return
        assert time.monotonic() < deadline, f"{seen} requests accounted, expected {total}"
        await asyncio.sleep(0.01)


OTHER_HOST = "other.example.com"


@dataclass
class Readings:
    """Flagger's three checks at the end of the batch, and canary-proxy's own count and mean
    of the canary's requests over the same two scrapes."""

    interval: str
    success: float
    duration: float
    old_duration: float
    canary_requests: float
    mean_ms: float

    def assert_exact(self) -> None:
        """The canary failed 20 of its 200 requests and answered each after 100 ms."""
        assert self.canary_requests == 200
        assert self.success == pytest.approx(90.0, rel=1e-12), self
        assert self.duration == pytest.approx(self.mean_ms, rel=1e-9), self
        assert self.old_duration == pytest.approx(self.mean_ms, rel=1e-9), self
        assert 100 <= self.duration < 250, f"the canary answers after 100 ms; the proxy adds little: {self}"


async def flagger_reads(
    prom: Prom, url: str, accounted: Callable[[int], Awaitable[None]], *, namespace: str, route: str
) -> Readings:
    """Send a warm-up, then a fixed batch, each followed by a scrape; evaluate Flagger's
    checks for Ingress ``web`` at the second scrape over an interval reaching back exactly to
    the first (a duration such as ``2345ms``, as Flagger fills ``{{ interval }}`` from the
    Canary's metric).

    Exact, not sampled: every series the checks read exists after the warm-up, so each has
    its first sample in the window at the window's start and its last at its end: ``rate()``
    extrapolates none of them and the ratios are the batch's. Stable's requests and another
    Ingress's failing canary must not count."""

    async def batch(canaries: int, stables: int, others: int, total: int) -> float:
        await asyncio.gather(
            send(url, canaries, version="canary"),
            send(url, stables, version="stable"),
            send(url, others, version="canary", host=OTHER_HOST),
        )
        await accounted(total)
        return await prom.scrape_after(time.time())

    start = await batch(10, 10, 5, total=25)  # one of any 10 canary requests fails: both series
    end = await batch(200, 100, 20, total=345)  # 20 of any 200 fail
    interval = f"{round((end - start) * 1000)}ms"
    flagger = {"namespace": namespace, "ingress": "web", "interval": interval}
    own = f'canary_proxy_request_duration_seconds_{{}}{{{{route="{route}",version="canary"}}}}'
    sums = [await prom.scalar(own.format("sum"), at) for at in (start, end)]
    counts = [await prom.scalar(own.format("count"), at) for at in (start, end)]
    return Readings(
        interval,
        success=await prom.scalar(render(SUCCESS_RATE, **flagger), end),
        duration=await prom.scalar(render(DURATION, **flagger), end),
        old_duration=await prom.scalar(render(OLD_DURATION, **flagger), end),
        canary_requests=counts[1] - counts[0],
        mean_ms=(sums[1] - sums[0]) / (counts[1] - counts[0]) * 1000,
    )


async def test_flaggers_nginx_checks_read_a_canary_that_fails_10_percent(tmp_path: Path) -> None:
    """The canary answers every 10th request with 503 and takes 100 ms; stable never fails
    and takes 10 ms; another Ingress's canary fails every request. Flagger's checks for
    Ingress ``web`` must read exactly 90 % and the canary's own mean latency."""
    async with flaky(0.01) as stable, flaky(0.1, every=10) as canary, flaky(0.0, every=1) as broken:
        other = Origin("shop", "other", "other", OTHER_HOST, "/", canary="shop-broken-80")
        routes = [
            ingress_route("shop/web", stable.url, canary.url, ORIGIN),
            ingress_route("shop/other", stable.url, broken.url, other, host=OTHER_HOST),
        ]
        async with (
            serving(routes) as proxy,
            run_prometheus(proxy.target, tmp_path) as url,
            aiohttp.ClientSession() as session,
        ):
            readings = await flagger_reads(
                Prom(url, session),
                proxy.url,
                partial(counted, proxy.registry),
                namespace="shop",
                route="shop/web",
            )
    readings.assert_exact()


async def test_flaggers_checks_read_serve_ingress_class_with_workers(
    fake_kube: FakeKube, tmp_path: Path
) -> None:
    """The same through the real ``serve --ingress-class --workers 2`` (nginx metrics on by
    default in Ingress mode), fed by the fake API server: Flagger's Ingress ``web`` and its
    A/B canary Ingress ``web-canary`` (``canary-by-header``) in namespace ``shop``, and an
    Ingress ``other`` whose canary fails every request. Both workers' requests are summed."""
    async with flaky(0.01) as stable, flaky(0.1, every=10) as canary, flaky(0.0, every=1) as broken:
        by_header = {P + "canary": "true", P + "canary-by-header": "X-Canary"}
        for name, backend in (("web", stable), ("web-canary", canary), ("other", stable), ("broken", broken)):
            fake_kube.put_object("services", service(name, backend, namespace="shop"))  # type: ignore[arg-type]
        for name, host, svc, backend, annotations in (
            ("web", HOST, "web", stable, {}),
            ("web-canary", HOST, "web-canary", canary, by_header),
            ("other", OTHER_HOST, "other", stable, {}),
            ("other-canary", OTHER_HOST, "broken", broken, by_header),
        ):
            obj = ingress(name, host, svc, backend.port, namespace="shop", annotations=annotations)
            fake_kube.put_object("ingresses", obj)
        proxy = await serve_ingresses(fake_kube, tmp_path, "--workers", "2")
        try:
            async with asyncio.timeout(10):  # every worker serves both canaries
                while True:
                    if None not in [await route_weight(proxy, name) for name in ("shop/web", "shop/other")]:
                        break
                    await asyncio.sleep(0.05)

            async def accounted(total: int) -> None:
                await wait_metric(
                    proxy,
                    lambda m: sum(m.series("canary_proxy_requests_total").values()) == total,
                    what=f"{total} requests accounted",
                )

            target = proxy.admin_url.removeprefix("http://")
            async with run_prometheus(target, tmp_path) as url, aiohttp.ClientSession() as session:
                readings = await flagger_reads(
                    Prom(url, session), proxy.url, accounted, namespace="shop", route="shop/web"
                )
            text = await proxy.metrics_text()
        finally:
            await stop_proxy(proxy)
    readings.assert_exact()
    upstream = f"shop-web-canary-{canary.port}"  # NAMESPACE-SERVICE-PORT
    common = f'host="{HOST}",ingress="web",method="GET",namespace="shop",path="/",service="web"'
    assert sorted(page_lines(text, "nginx_ingress_controller_requests{canary=")) == sorted(
        [
            f'nginx_ingress_controller_requests{{canary="",{common},status="200"}} 110.0',
            f'nginx_ingress_controller_requests{{canary="{upstream}",{common},status="200"}} 189.0',
            f'nginx_ingress_controller_requests{{canary="{upstream}",{common},status="503"}} 21.0',
            f'nginx_ingress_controller_requests{{canary="shop-broken-{broken.port}",host="{OTHER_HOST}",ingress="other",'
            f'method="GET",namespace="shop",path="/",service="other",status="503"}} 25.0',
        ]
    )


async def test_nginx_metrics_off_in_ingress_mode(fake_kube: FakeKube, tmp_path: Path) -> None:
    async with flaky(0.0) as stable:
        fake_kube.put_object("services", service("web", stable, namespace="shop"))  # type: ignore[arg-type]
        fake_kube.put_object("ingresses", ingress("web", HOST, "web", stable.port, namespace="shop"))
        proxy = await serve_ingresses(fake_kube, tmp_path, "--nginx-metrics", "off")
        try:
            async with asyncio.timeout(10):
                while True:
                    if await send(proxy.url, 1, version="stable", concurrency=1) == [200]:
                        break
                    await asyncio.sleep(0.05)
            text = await proxy.metrics_text()
        finally:
            await stop_proxy(proxy)
    assert "nginx_ingress_controller" not in text
    assert (
        'canary_proxy_requests_total{code="200",method="GET",route="shop/web",version="stable"} 1.0' in text
    )


# -- several workers ------------------------------------------------------------------------------

WORKER = """
import sys
from prometheus_client import CollectorRegistry
from canary_proxy.metrics import Metrics
from canary_proxy.routes import Origin

origin = Origin(*sys.argv[2:7], canary=sys.argv[7])
metrics = Metrics(CollectorRegistry(), nginx=True)
series = metrics.series("shop/web", origin)
for _ in range(int(sys.argv[1])):
    series.request("canary", 200, "GET", 0.1)
series.request("canary", 503, "GET", 0.3)
series.request("stable", 200, "GET", 0.1)
metrics.flush([series])  # as a worker does at the end of each batch
"""


async def test_workers_families_are_summed_without_a_pid(tmp_path: Path) -> None:
    """With ``--workers N`` each worker writes prometheus_client's multiprocess files and the
    supervisor's /metrics sums them: the nginx families the same way as canary-proxy's."""
    origin = [ORIGIN.namespace, ORIGIN.ingress, ORIGIN.service, ORIGIN.host, ORIGIN.path, ORIGIN.canary]
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    for count in (3, 4):
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", WORKER, str(count), *origin, env=env
        )
        assert await asyncio.wait_for(process.wait(), 30) == 0
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(tmp_path))  # type: ignore[no-untyped-call]
    text = exposition(registry).decode()

    assert "# TYPE nginx_ingress_controller_requests counter" in text and "pid=" not in text
    common = f'host="{HOST}",ingress="web",method="GET",namespace="shop",path="/",service="web"'
    assert sorted(page_lines(text, "nginx_ingress_controller_requests")) == [
        f'nginx_ingress_controller_requests{{canary="",{common},status="200"}} 2.0',
        f'nginx_ingress_controller_requests{{canary="{CANARY_UPSTREAM}",{common},status="200"}} 7.0',
        f'nginx_ingress_controller_requests{{canary="{CANARY_UPSTREAM}",{common},status="503"}} 2.0',
    ]
    canary = f'{{canary="{CANARY_UPSTREAM}",ingress="web",namespace="shop",service="web"}}'
    assert f"nginx_ingress_controller_ingress_upstream_latency_seconds_count{canary} 9.0" in text
    slow = f'{{canary="{CANARY_UPSTREAM}",{common},status="503"}}'
    assert f"nginx_ingress_controller_response_duration_seconds_count{slow} 2.0" in text
    assert f"nginx_ingress_controller_response_duration_seconds_sum{slow} 0.6" in text
