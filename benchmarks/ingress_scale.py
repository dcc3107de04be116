"""Ingress mode at scale: start to ready, RSS, and a canary weight patch to its effect.

Runs the real proxy (``serve --ingress-class``) against the tests' fake API server on
loopback, with N Ingresses of two paths each (2N routes) over H hosts, and one canary
Ingress (Argo Rollouts' shape) on the first route. It reports:

- start -> ready: from spawning the process to its "ready" log line (the first lists of
  Ingresses and Services read, every route built and swapped in);
- RSS once ready, and of a proxy serving one Ingress, for the difference;
- canary-weight merge patch -> in effect: from the PATCH (through the real Kubernetes
  client) to the log line saying the route changed (written right after the swap).

Usage:

    .venv/bin/python benchmarks/ingress_scale.py [--ingresses 500] [--hosts 200] [--patches 30]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from canary_proxy.k8s import load_config
from tests.conftest import ProxyProcess, start_backend, start_proxy, stop_proxy
from tests.fakekube import FakeKube, run_fake_kube

P = "nginx.ingress.kubernetes.io/"
NS = "bench"


def log_time(entry: dict[str, object]) -> float:
    stamp = str(entry["time"]).replace("Z", "+00:00")
    return datetime.datetime.fromisoformat(stamp).timestamp()


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def service(name: str, port: int) -> dict[str, Any]:
    spec = {"clusterIP": "127.0.0.1", "ports": [{"name": "http", "port": port}]}
    return {"metadata": {"name": name, "namespace": NS}, "spec": spec}


def ingress(name: str, host: str, svc: str, paths: list[str], annotations: dict[str, str]) -> dict[str, Any]:
    backend = {"service": {"name": svc, "port": {"name": "http"}}}
    http = {"paths": [{"path": p, "pathType": "Prefix", "backend": backend} for p in paths]}
    return {
        "metadata": {"name": name, "namespace": NS, "annotations": annotations},
        "spec": {"ingressClassName": "canary-proxy", "rules": [{"host": host, "http": http}]},
    }


def populate(fake: FakeKube, ingresses: int, hosts: int, stable_port: int, canary_port: int) -> None:
    fake.put_object("services", service("stable", stable_port))
    fake.put_object("services", service("canary", canary_port))
    for i in range(ingresses):
        host = f"h{i % hosts}.bench.test"
        paths = [f"/a{i // hosts}", f"/b{i // hosts}"]
        fake.put_object("ingresses", ingress(f"app{i}", host, "stable", paths, {}))
    canary = ingress("app0-canary", "h0.bench.test", "canary", ["/a0", "/b0"], {P + "canary": "true"})
    fake.put_object("ingresses", canary)


async def start(fake: FakeKube, tmp: Path) -> tuple[ProxyProcess, float]:
    assert fake.kubeconfig is not None
    started = time.perf_counter()
    proxy = await start_proxy(
        None, tmp, "--ingress-class", "--kubeconfig", str(fake.kubeconfig), "--access-log", "off",
        use_config=False,
    )  # fmt: skip
    return proxy, time.perf_counter() - started


async def patch_latencies(fake: FakeKube, proxy: ProxyProcess, patches: int) -> list[float]:
    assert fake.kubeconfig is not None
    latencies: list[float] = []
    from kubernetes.aio.client import ApiClient, NetworkingV1Api

    config = await load_config(str(fake.kubeconfig))
    async with ApiClient(config.configuration) as client:
        api = NetworkingV1Api(client)
        for i in range(patches):
            weight = str(i % 99 + 1)
            mark = len(proxy.logs)
            started = time.time()
            body = {"metadata": {"annotations": {P + "canary-weight": weight}}}
            await api.patch_namespaced_ingress(
                "app0-canary", NS, body, _content_type="application/merge-patch+json"
            )
            entry = await proxy.wait_log(
                lambda e: (
                    str(e.get("msg", "")).startswith("config loaded")
                    and f"{NS}/app0#1" in e.get("changed", [])
                ),
                since=mark,
            )
            latencies.append(log_time(entry) - started)
    return latencies


async def main(ingresses: int, hosts: int, patches: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="ingress-scale-"))
    stable, canary = await start_backend("stable"), await start_backend("canary")
    try:
        async with run_fake_kube(bookmark_interval=5) as fake:
            fake.write_kubeconfig(tmp / "kubeconfig")
            populate(fake, 1, 1, stable.port, canary.port)
            one, one_ready = await start(fake, tmp)
            one_rss = rss_mib(one.pid)
            await stop_proxy(one)
        async with run_fake_kube(bookmark_interval=5) as fake:
            fake.write_kubeconfig(tmp / "kubeconfig")
            populate(fake, ingresses, hosts, stable.port, canary.port)
            proxy, ready = await start(fake, tmp)
            try:
                rss = rss_mib(proxy.pid)
                latencies = await patch_latencies(fake, proxy, patches)
            finally:
                await stop_proxy(proxy)
    finally:
        await stable.stop()
        await canary.stop()
    ms = sorted(x * 1000 for x in latencies)
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    routes = 2 * ingresses + 2
    print(f"{ingresses + 1} Ingresses, {routes} routes over {hosts} hosts:")
    print(f"  start -> ready   {ready:.2f} s   (one Ingress: {one_ready:.2f} s)")
    print(f"  RSS when ready   {rss:.1f} MiB (one Ingress: {one_rss:.1f} MiB; +{rss - one_rss:.1f} MiB)")
    print(f"  weight patch -> in effect over {len(ms)} patches: p50 {statistics.median(ms):.0f} ms, "
          f"p99 {p99:.0f} ms, max {ms[-1]:.0f} ms (log timestamps: 1 ms resolution)")  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ingresses", type=int, default=500)
    parser.add_argument("--hosts", type=int, default=200)
    parser.add_argument("--patches", type=int, default=30)
    args = parser.parse_args()
    asyncio.run(main(args.ingresses, args.hosts, args.patches))
