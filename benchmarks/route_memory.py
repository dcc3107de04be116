"""Memory of many routes: the proxy's RSS serving 1 route, then 1,000 routes, in one run.

For each setup it starts the real proxy (``serve --config-dir``, one file per route), reads
its RSS once it is ready, then sends one request per route and version (``X-Canary:
always`` and ``never``, so every route has both versions' metric series and has used both
its pools) and reads the RSS again; then reads ``/stats`` once a second, as the dashboard
does, and reads the RSS after three of the sampler's snapshots (a proxy with more than 20
routes takes none until ``/stats`` is read; one with a few takes them from the start).
Setups:

- **1 route**: the reference;
- **N routes, shared upstreams**: N routes over H hosts, all pointing at one stable/canary
  pair (pools are shared by URL: two pools, a few connections);
- **N routes, own upstreams** (``--own-upstreams``): each route its own stable and canary
  URL (one loopback address per route, 127.1.x.y, two ports), so 2N pools, each holding the
  connection its request used.

    .venv/bin/python benchmarks/route_memory.py [--routes 1000] [--hosts 200] [--own-upstreams]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.idle_connections import rss_mib
from tests.conftest import ProxyProcess, peak_rss_mib, start_proxy, stop_proxy

STATS_SETTLE = 2.5  # seconds: two of the sampler's once-a-second reads of every series
WATCHED = 3  # /stats reads, one a second, before the RSS "with the dashboard open"


class Upstream(asyncio.Protocol):
    """A minimal keep-alive HTTP/1.1 upstream: 200 with a 2-byte body to each GET."""

    RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            self.buffer = self.buffer[end + 4 :]
            self.transport.write(self.RESPONSE)


@dataclass(frozen=True)
class Setup:
    label: str
    routes: int
    hosts: int
    own_upstreams: bool


def address(k: int) -> str:
    """Route k's own loopback address (all of 127.0.0.0/8 is loopback on Linux)."""
    return f"127.1.{k // 250}.{k % 250 + 1}"


def route_files(folder: Path, setup: Setup, url: Callable[[int, str], str]) -> list[tuple[str, str]]:
    """Write one file per route; return each route's (Host, path) for its requests."""
    targets = []
    for k in range(setup.routes):
        host, path = f"h{k % setup.hosts}.bench.test", "/" if k < setup.hosts else f"/r{k // setup.hosts}"
        if setup.routes == 1:
            host = ""
        document = {"stable-url": url(k, "stable"), "canary-url": url(k, "canary"),
                    "canary-weight": 10, "canary-by-header": "X-Canary"}  # fmt: skip
        if host:
            document.update(host=host, path=path)
        (folder / f"route-{k:05d}.yaml").write_text(yaml.safe_dump(document))
        targets.append((host or "any.bench.test", path))
    return targets


async def one_request_each(proxy: ProxyProcess, targets: list[tuple[str, str]]) -> int:
    """One request per route and version, 32 at a time; the number that failed."""
    queue = [(host, path, force) for host, path in targets for force in ("always", "never")]
    failed = 0

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal failed
        while queue:
            host, path, force = queue.pop()
            url = proxy.url + path.rstrip("/") + "/x"
            async with session.get(url, headers={"Host": host, "X-Canary": force}) as r:
                await r.read()
                failed += r.status != 200

    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        await asyncio.gather(*(client(session) for _ in range(32)))
    return failed


Measured = tuple[float, float, float, float, int]


async def watched(proxy: ProxyProcess) -> float:
    """The RSS after ``/stats`` was read once a second ``WATCHED`` times, as the dashboard does."""
    for _ in range(WATCHED):
        await proxy.admin_json("/stats")
        await asyncio.sleep(1.0)
    return rss_mib(proxy.pid)


async def measure(setup: Setup, ports: tuple[int, int], tmp: Path) -> Measured:
    """(RSS ready, RSS after one request per route and version, RSS with /stats read, peak RSS,
    failed requests)."""
    folder = tmp / f"routes-{setup.routes}-{setup.own_upstreams}"
    folder.mkdir()

    def url(k: int, version: str) -> str:
        port = ports[version == "canary"]
        return f"http://{address(k) if setup.own_upstreams else '127.0.0.1'}:{port}"

    targets = route_files(folder, setup, url)
    proxy = await start_proxy(
        None, tmp, "--config-dir", str(folder), "--access-log", "off", use_config=False
    )  # fmt: skip
    try:
        await asyncio.sleep(STATS_SETTLE)
        ready = rss_mib(proxy.pid)
        failed = await one_request_each(proxy, targets)
        await asyncio.sleep(STATS_SETTLE)
        after = rss_mib(proxy.pid)
        return ready, after, await watched(proxy), peak_rss_mib(proxy.pid), failed
    finally:
        await stop_proxy(proxy)


async def start_upstreams(own: list[str]) -> tuple[list[asyncio.Server], tuple[int, int]]:
    """The stable and the canary upstream: each on 127.0.0.1 at a free port, and on every
    address of ``own`` at that same port."""
    loop = asyncio.get_running_loop()
    servers, ports = [], []
    for _ in range(2):
        server = await loop.create_server(Upstream, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        servers.append(server)
        if own:
            servers.append(await loop.create_server(Upstream, own, port))
        ports.append(port)
    return servers, (ports[0], ports[1])


async def main(args: argparse.Namespace) -> None:
    own = [address(k) for k in range(args.routes)] if args.own_upstreams else []
    servers, ports = await start_upstreams(own)
    many = f"{args.routes:,} routes / {args.hosts} hosts"
    setups = [
        Setup("1 route", 1, 1, False),
        Setup(f"{many}, shared upstreams", args.routes, args.hosts, False),
    ]
    if args.own_upstreams:
        setups.append(Setup(f"{many}, own upstreams", args.routes, args.hosts, True))
    tmp = Path(tempfile.mkdtemp(prefix="route-memory-"))
    rows: list[tuple[Setup, *Measured]] = []
    try:
        for setup in setups:
            rows.append((setup, *await measure(setup, ports, tmp)))
    finally:
        for server in servers:
            server.close()
    report(rows)


def report(rows: list[tuple[Setup, *Measured]]) -> None:
    loadavg = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    print(f"RSS of the proxy (--workers 1, VmRSS), MiB; load average at the end {loadavg}\n")
    print("| routes | ready | after 1 request per route and version | and /stats read 3 s | peak | failed |")
    print("|---|--:|--:|--:|--:|--:|")
    base, base_watched = rows[0][2], rows[0][3]
    for setup, ready, after, seen, peak, failed in rows:
        extra = f" (+{after - base:.1f})" if setup.routes > 1 else ""
        more = f" (+{seen - base_watched:.1f})" if setup.routes > 1 else ""
        print(
            f"| {setup.label} | {ready:.1f} | {after:.1f}{extra} | {seen:.1f}{more} | {peak:.1f} | {failed} |"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--routes", type=int, default=1000)
    parser.add_argument("--hosts", type=int, default=200)
    parser.add_argument("--own-upstreams", action="store_true", help="also: each route its own upstreams")
    asyncio.run(main(parser.parse_args()))
