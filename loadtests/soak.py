"""Soak test: moderate mixed traffic for a while, with weight changes and a backend restart.

Starts two backends and the real proxy on loopback, then for ``--duration`` seconds runs
browser-like (cookies, sticky), API (no cookies) and upload traffic at a bounded rate,
rewrites the config's weight every few seconds, and restarts the stable backend halfway.
Every ``--sample`` seconds it records the proxy's RSS (all its processes), open file
descriptors and the p99 of the last period, and prints them as a table.

It fails (exit 1) if memory or file descriptors keep growing: comparing the second half
of the run with the first, after a warm-up, the RSS may not grow by more than
``--max-rss-growth`` MiB and the FD count by more than ``--max-fd-growth``. It also fails on
any error other than the ones expected while the backend is restarting (502s then).

    .venv/bin/python loadtests/soak.py --duration 600
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import yaml
from aiohttp import web

VERSION = web.AppKey("version", str)


async def _answer(request: web.Request) -> web.Response:
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
    return web.json_response({"version": request.app[VERSION], "received": size})


async def start_backend(version: str, port: int = 0) -> tuple[web.AppRunner, int]:
    """A tiny backend of our own: it reads whatever body it gets and says who it is."""
    app = web.Application(client_max_size=0)
    app[VERSION] = version
    app.router.add_route("*", "/{tail:.*}", _answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, reuse_address=True).start()
    return runner, runner.addresses[0][1]


@dataclass
class Sample:
    at: float
    rss_mib: float
    fds: int
    p99_ms: float | None
    requests: int


@dataclass
class Stats:
    latencies: list[float] = field(default_factory=list)
    requests: int = 0
    errors: int = 0
    restart_errors: int = 0


def process_tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        with contextlib.suppress(FileNotFoundError):
            for task in Path(f"/proc/{current}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
    return pids


def rss_and_fds(pid: int) -> tuple[float, int]:
    rss, fds = 0, 0
    for current in process_tree(pid):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss += int(line.split()[1])
            fds += len(os.listdir(f"/proc/{current}/fd"))
    return rss / 1024, fds


def write_config(path: Path, config: dict[str, object]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(config))
    os.replace(tmp, path)


async def start_proxy(config: Path, workers: int) -> tuple[asyncio.subprocess.Process, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "canary_proxy", "serve", "--config", str(config), "--listen", "127.0.0.1:0",
        "--admin-listen", "127.0.0.1:0", "--drain-delay", "0", "--workers", str(workers),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stderr is not None
    import json

    while line := await asyncio.wait_for(process.stderr.readline(), 30):
        entry = json.loads(line)
        if entry.get("msg") == "ready":
            asyncio.get_running_loop().create_task(_drain(process.stderr))
            return process, "http://" + entry["public"]
    raise RuntimeError("the proxy exited before it was ready")


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.read(65536):
        pass


async def user(url: str, stats: Stats, stop: asyncio.Event, kind: str, restarting: asyncio.Event) -> None:
    jar: aiohttp.abc.AbstractCookieJar = (
        aiohttp.CookieJar() if kind == "browser" else aiohttp.DummyCookieJar()
    )
    async with aiohttp.ClientSession(cookie_jar=jar, timeout=aiohttp.ClientTimeout(total=10)) as session:
        while not stop.is_set():
            started = time.monotonic()
            try:
                if kind == "upload":
                    body = os.urandom(random.randint(1, 64) * 1024)
                    async with session.post(url + "/upload", data=body) as r:
                        await r.read()
                        status = r.status
                else:
                    async with session.get(url + f"/{kind}/{random.randint(1, 1000)}") as r:
                        await r.read()
                        status = r.status
            except (aiohttp.ClientError, TimeoutError):
                status = 0
            stats.requests += 1
            stats.latencies.append(time.monotonic() - started)
            if status != 200:
                if restarting.is_set():
                    stats.restart_errors += 1
                else:
                    stats.errors += 1
            await asyncio.sleep(0.01)  # moderate: each user at most ~100 requests/s


async def soak(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="canary-soak-"))
    stable_runner, stable_port = await start_backend("v1")
    canary_runner, canary_port = await start_backend("v2")
    config: dict[str, object] = {
        "stable-url": f"http://127.0.0.1:{stable_port}",
        "canary-url": f"http://127.0.0.1:{canary_port}",
        "canary-weight": 10,
    }
    path = workdir / "canary.yaml"
    write_config(path, config)
    proxy, url = await start_proxy(path, args.workers)
    stats, stop, restarting = Stats(), asyncio.Event(), asyncio.Event()
    kinds = ["browser"] * 4 + ["api"] * 4 + ["upload"] * 2
    users = [asyncio.create_task(user(url, stats, stop, kind, restarting)) for kind in kinds]
    samples: list[Sample] = []
    started = time.monotonic()
    next_weight, restarted, last_requests = started + 3, False, 0
    try:
        while (now := time.monotonic()) - started < args.duration:
            await asyncio.sleep(args.sample)
            now = time.monotonic()
            if now >= next_weight:
                config["canary-weight"] = random.choice([0, 5, 10, 25, 50])
                write_config(path, config)
                next_weight = now + 3
            if not restarted and now - started >= args.duration / 2:
                restarted = True
                restarting.set()
                await stable_runner.cleanup()  # the stable backend goes away...
                stable_runner, _ = await start_backend("v1", port=stable_port)  # ...and comes back
                await asyncio.sleep(1)
                restarting.clear()
            latencies, stats.latencies = stats.latencies, []
            rss, fds = rss_and_fds(proxy.pid)
            p99 = statistics.quantiles(latencies, n=100)[98] * 1000 if len(latencies) >= 100 else None
            samples.append(Sample(now - started, rss, fds, p99, stats.requests - last_requests))
            last_requests = stats.requests
            print_sample(samples[-1])
    finally:
        stop.set()
        await asyncio.gather(*users, return_exceptions=True)
        proxy.terminate()
        await proxy.wait()
        await stable_runner.cleanup()
        await canary_runner.cleanup()
    return verdict(samples, stats, args)


def print_sample(s: Sample) -> None:
    p99 = f"{s.p99_ms:7.1f}" if s.p99_ms is not None else "      -"
    print(
        f"{s.at:7.1f}s  rss {s.rss_mib:7.1f} MiB  fds {s.fds:5d}  p99 {p99} ms  requests {s.requests:6d}",
        flush=True,
    )


def verdict(samples: list[Sample], stats: Stats, args: argparse.Namespace) -> int:
    steady = [s for s in samples if s.at >= args.warmup]
    if len(steady) < 4:
        print("FAIL: too short to judge growth (raise --duration)")
        return 1
    half = len(steady) // 2
    first, second = steady[:half], steady[half:]
    rss_growth = statistics.median(s.rss_mib for s in second) - statistics.median(s.rss_mib for s in first)
    fd_growth = statistics.median(s.fds for s in second) - statistics.median(s.fds for s in first)
    p99s = [s.p99_ms for s in steady if s.p99_ms is not None]
    print(
        f"requests {stats.requests}, errors {stats.errors} "
        f"(+{stats.restart_errors} during the backend restart); "
        f"RSS {steady[0].rss_mib:.1f} -> {steady[-1].rss_mib:.1f} MiB (median growth {rss_growth:+.1f} MiB); "
        f"FDs {steady[0].fds} -> {steady[-1].fds} (median growth {fd_growth:+.0f}); "
        f"p99 median {statistics.median(p99s):.1f} ms, max {max(p99s):.1f} ms"
    )
    failures = []
    if rss_growth > args.max_rss_growth:
        failures.append(f"RSS grew by {rss_growth:.1f} MiB > {args.max_rss_growth} MiB")
    if fd_growth > args.max_fd_growth:
        failures.append(f"FDs grew by {fd_growth:.0f} > {args.max_fd_growth}")
    if stats.errors:
        failures.append(f"{stats.errors} requests failed outside the backend restart")
    for failure in failures:
        print(f"FAIL: {failure}")
    if not failures:
        print("PASS: no growth in memory or file descriptors, no unexpected errors")
    return 1 if failures else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=600, help="seconds [600]")
    parser.add_argument("--sample", type=float, default=2.0, help="seconds between samples [2]")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds not judged [10]")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--max-rss-growth", type=float, default=8.0, help="MiB [8]")
    parser.add_argument("--max-fd-growth", type=float, default=20, help="[20]")
    sys.exit(asyncio.run(soak(parser.parse_args())))


if __name__ == "__main__":
    main()
