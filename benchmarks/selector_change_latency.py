"""How long a change to one of 1,000 ConfigMap routes takes to reach the data path, under traffic.

The ``--configmap-selector`` twin of ``route_change_latency.py``: runs the real proxy
(``serve --configmap-selector``) against the tests' fake API server on loopback, with
``--routes`` labelled ConfigMaps over ``--hosts`` hosts, all pointing at one stable/canary
pair of backends, while clients keep ``--concurrency`` requests in flight on
``--load-routes`` other routes. Then it changes one ConfigMap ``--changes`` times, flipping
its canary-weight between 0 and 100, with a probe sending requests to that route one after
another. For each change it times:

- **event -> applied**: from the moment the fake API server finished writing the MODIFIED
  event to the proxy's watch stream to the proxy's ``config loaded`` log line, written right
  after the new route table was swapped in (log times are whole milliseconds, truncated);
- **event -> answered**: from that event to the first probe answer from the new version.

It counts the background requests that failed. Usage:

    .venv/bin/python benchmarks/selector_change_latency.py [--routes 1000] [--changes 30]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.route_change_latency import (
    PROBE,
    Load,
    Probe,
    hosts_of,
    log_time,
    parse_arguments,
    print_report,
)
from tests import fakekube
from tests.conftest import Backend, start_backend, start_proxy, stop_proxy

LABELS = {"canary-proxy.io/route": "true"}
SELECTOR = "canary-proxy.io/route=true"


class EventTimes:
    """When the fake API server finished writing each event of one ConfigMap to a watch."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.sent: dict[str, float] = {}  # resourceVersion -> time.time()
        self.arrived = asyncio.Event()
        self._send = fakekube._send

    async def send(self, response: Any, etype: str, obj: fakekube.Obj) -> None:
        await self._send(response, etype, obj)
        meta = obj.get("metadata", {})
        if etype == "MODIFIED" and meta.get("name") == self.name:
            self.sent[meta["resourceVersion"]] = time.time()
            self.arrived.set()

    async def of(self, version: str) -> float:
        """The time its event went out (the watch may not have sent it yet)."""
        while version not in self.sent:
            self.arrived.clear()
            await self.arrived.wait()
        return self.sent[version]


def route_data(stable: Backend, canary: Backend, *, host: str, path: str, weight: int) -> dict[str, str]:
    return {
        "host": host,
        "path": path,
        "stable-url": stable.url,
        "canary-url": canary.url,
        "canary-weight": str(weight),
    }


async def main(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="selector-change-"))
    stable, canary = await start_backend("stable"), await start_backend("canary")
    pairs = hosts_of(args.routes - 1, args.hosts)
    events = EventTimes("probe")
    fakekube._send = events.send  # type: ignore[assignment]
    changes: list[tuple[float, float]] = []
    load, stop = Load(), asyncio.Event()
    started = time.monotonic()
    async with fakekube.run_fake_kube(bookmark_interval=5) as fake:
        kubeconfig = fake.write_kubeconfig(tmp / "kubeconfig")
        for k, (host, path) in enumerate(pairs):
            data = route_data(stable, canary, host=host, path=path, weight=10)
            fake.put_configmap(f"route-{k:05d}", data, labels=LABELS)
        fake.put_configmap("probe", route_data(stable, canary, host=PROBE, path="/", weight=0), labels=LABELS)
        proxy = await start_proxy(
            None, tmp, "--configmap-selector", SELECTOR, "--kubeconfig", str(kubeconfig),
            "--access-log", "off", use_config=False,
        )  # fmt: skip
        probe = Probe(proxy.url)
        targets = [pairs[k * len(pairs) // args.load_routes] for k in range(args.load_routes)]
        tasks = [
            asyncio.create_task(load.run(proxy.url, targets, stop, args.load_limit))
            for _ in range(args.concurrency)
        ]
        tasks.append(asyncio.create_task(probe.run(stop)))
        rng = random.Random(1)
        try:
            await probe.first("stable", 0)
            for i in range(args.changes):
                await asyncio.sleep(rng.uniform(0, 0.25))  # as the file benchmark's changes
                weight, version = (100, "canary") if i % 2 == 0 else (0, "stable")
                mark = len(proxy.logs)
                changed = fake.patch_configmap("probe", {"canary-weight": str(weight)})
                entry = await proxy.wait_log(
                    lambda e: str(e.get("msg", "")).startswith("config loaded"), since=mark
                )
                sent = await events.of(changed["metadata"]["resourceVersion"])
                answered = await probe.first(version, sent)
                changes.append((log_time(entry) - sent, answered - sent))
            stop.set()
            await asyncio.gather(*tasks)
        finally:
            stop.set()
            await stop_proxy(proxy)
            await asyncio.gather(*tasks, return_exceptions=True)
    await stable.stop()
    await canary.stop()
    report(args, changes, load, len(probe.answers), time.monotonic() - started)


def report(
    args: argparse.Namespace, changes: list[tuple[float, float]], load: Load, probed: int, seconds: float
) -> None:
    rows: list[tuple[str, Callable[[tuple[float, float]], float]]] = [
        ("watch event sent -> applied (`config loaded`)", lambda c: c[0]),
        ("watch event sent -> first answer from the new version", lambda c: c[1]),
    ]
    print_report(args, ", one labelled ConfigMap each", changes, rows, load, probed, seconds)


if __name__ == "__main__":
    asyncio.run(main(parse_arguments(__doc__.splitlines()[0], "ConfigMaps", 30)))
