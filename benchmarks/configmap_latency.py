"""How long from a ConfigMap PATCH to the new weight being in effect in a running proxy.

Runs the real proxy (``serve --configmap``) against the tests' fake API server on loopback,
PATCHes canary-weight N times through the real Kubernetes client, and times each PATCH's
start to the proxy's log line saying it applied that weight (the log line is written right
after the new config was swapped in). Usage:

    .venv/bin/python benchmarks/configmap_latency.py [--patches 200]
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from canary_proxy.k8s import KubeClient, load_config
from tests.conftest import start_backend, start_proxy, stop_proxy
from tests.fakekube import run_fake_kube


def log_time(entry: dict[str, object]) -> float:
    stamp = str(entry["time"]).replace("Z", "+00:00")
    return datetime.datetime.fromisoformat(stamp).timestamp()


async def main(patches: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="cm-latency-"))
    stable, canary = await start_backend("stable"), await start_backend("canary")
    async with run_fake_kube(bookmark_interval=5) as fake:
        kubeconfig = fake.write_kubeconfig(tmp / "kubeconfig")
        fake.put_configmap("canary-proxy", {"stable-url": stable.url, "canary-url": canary.url})
        proxy = await start_proxy(
            None, tmp, "--configmap", "default/canary-proxy", "--kubeconfig", str(kubeconfig),
            "--access-log", "off", use_config=False,
        )  # fmt: skip
        latencies: list[float] = []
        async with KubeClient(await load_config(kubeconfig)) as client:
            for i in range(patches):
                weight = f"{(i % 99) + 1}.5"
                state = await client.get_configmap("default", "canary-proxy")
                mark = len(proxy.logs)
                started = time.time()
                await client.patch_configmap(
                    "default", "canary-proxy", data={"canary-weight": weight},
                    resource_version=state.resource_version,
                )  # fmt: skip
                entry = await proxy.wait_log(
                    lambda e, w=float(weight): e.get("effective", {}).get("canary-weight") == w, since=mark
                )
                latencies.append(log_time(entry) - started)
        await stop_proxy(proxy)
    await stable.stop()
    await canary.stop()
    ms = sorted(x * 1000 for x in latencies)
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    print(f"PATCH -> weight in effect over {len(ms)} patches: p50 {statistics.median(ms):.1f} ms, "
          f"p99 {p99:.1f} ms, max {ms[-1]:.1f} ms (log timestamps have 1 ms resolution)")  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patches", type=int, default=200)
    asyncio.run(main(parser.parse_args().patches))
