"""How long a change to one of 1,000 routes takes to reach the data path, under traffic.

Runs the real proxy (``serve --config-dir``) on a directory of ``--routes`` route files over
``--hosts`` hosts, all pointing at one stable/canary pair of backends, while clients keep
``--concurrency`` requests in flight on ``--load-routes`` other routes. Then it changes one
route file ``--changes`` times, flipping its canary-weight between 0 and 100 (write a
temporary file, rename it over), with a probe sending requests to that route one after
another on one keep-alive connection. For each change it times:

- **seen -> applied**: from the poll that saw the change to the proxy's ``config loaded``
  log line, which is written right after the new route table was swapped in. The poll does
  not log; the directory is watched with inotify instead (in a process of its own, so that
  this busy one does not delay its clock readings): a poll stats the directory (which
  inotify does not see) and, when its mtime moved, lists it at once (an open), and the
  proxy's reading of a route file opens that. The poll that saw the change is the last
  directory open before the first file read (see ``DirectoryOpens.seen``); between them is
  the wait for the file to be 50 ms old (``SETTLE``), if it was not yet;
- **seen -> answered**: from that poll to the first probe answer from the new version;
- **write -> answered**: from the rename to that answer, which also holds the wait for the
  next poll (every ``POLL_INTERVAL``).

It counts the background requests that failed (a status other than 200, or an error) and
the requests each backend saw. Usage:

    .venv/bin/python benchmarks/route_change_latency.py [--routes 1000] [--changes 50]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import aiohttp
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from canary_proxy.sources.file import POLL_INTERVAL
from tests.conftest import Backend, ProxyProcess, start_backend, start_proxy, stop_proxy

PROBE = "probe.bench.test"


# -- what the proxy does to the directory, seen from outside ---------------------------------


# Run as its own process, so that nothing in this busy one delays its clock readings: it
# prints "ready", then one line per open, "dir TIME" (a poll's glob) or "file TIME" (a read).
# It watches the closes too (IN_CLOSE_NOWRITE), only so that two opens of the directory in
# a row are not coalesced into one event (inotify merges an event identical to the last).
WATCHER = """
import ctypes, os, struct, sys, time
libc = ctypes.CDLL(None, use_errno=True)
fd = libc.inotify_init1(os.O_CLOEXEC)
if fd < 0 or libc.inotify_add_watch(fd, sys.argv[1].encode(), 0x20 | 0x10) < 0:
    raise OSError(ctypes.get_errno(), "inotify")
print("ready", flush=True)
while True:
    data = os.read(fd, 1 << 16)
    now = time.time()
    offset = 0
    while offset < len(data):
        _, mask, _, size = struct.unpack_from("iIII", data, offset)
        name = data[offset + 16 : offset + 16 + size].rstrip(b"\\0")
        offset += 16 + size
        if not mask & 0x20:
            continue
        if mask & 0x40000000:
            print("dir", now, flush=True)
        elif name.endswith(b".yaml"):
            print("file", now, flush=True)
"""


@dataclass
class DirectoryOpens:
    """inotify on the route directory (IN_OPEN): when it was opened (each poll globs it) and
    when a route file was opened (the proxy reading the routes), in ``time.time()`` seconds."""

    directory: Path
    listings: list[float] = field(default_factory=list)
    reads: list[float] = field(default_factory=list)

    @contextlib.asynccontextmanager
    async def watching(self) -> AsyncIterator[None]:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", WATCHER, str(self.directory), stdout=asyncio.subprocess.PIPE
        )
        assert process.stdout is not None
        reader = None
        try:
            if await process.stdout.readline() != b"ready\n":
                raise SystemExit("the inotify watcher did not start")
            reader = asyncio.create_task(self._read(process.stdout))
            yield
        finally:
            if process.returncode is None:
                process.kill()
            await process.wait()
            if reader is not None:
                await reader

    async def _read(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            kind, at = line.split()
            (self.listings if kind == b"dir" else self.reads).append(float(at))

    def seen(self, after: float) -> tuple[float, float]:
        """(when the poll saw a change made at ``after``, the start of the read it caused).

        ``watch_dir`` stats the directory each poll and lists it (an open) as soon as its
        mtime moved, then reads the changed file: the poll is the last directory open before
        that read. A listing whose open came just before the write, and whose stats came
        after it, saw it at the write.
        """
        read = next((t for t in self.reads if t >= after), None)
        opens = [t for t in self.listings if t < (read or 0)]
        if read is None or not opens:
            raise SystemExit(f"not the poll, read sequence: opens {opens[-2:]}, read {read}")
        return max(opens[-1], after), read


# -- routes and traffic ----------------------------------------------------------------------


def route_document(stable: Backend, canary: Backend, *, host: str, path: str, weight: int) -> str:
    return yaml.safe_dump(
        {
            "host": host,
            "path": path,
            "stable-url": stable.url,
            "canary-url": canary.url,
            "canary-weight": weight,
        }
    )


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")  # not *.yaml: the proxy never reads it
    tmp.write_text(text)
    os.replace(tmp, path)


def hosts_of(routes: int, hosts: int) -> list[tuple[str, str]]:
    """Route k: host ``h{k % hosts}``, path ``/`` for the first ``hosts`` routes, ``/rN`` after."""
    return [(f"h{k % hosts}.bench.test", "/" if k < hosts else f"/r{k // hosts}") for k in range(routes)]


@dataclass
class Load:
    """Requests kept in flight on some routes; every failure counted."""

    sent: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)

    async def run(self, url: str, targets: list[tuple[str, str]], stop: asyncio.Event, limit: int) -> None:
        """One client; ``limit`` bounds the requests of all of them together."""
        async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
            k = 0
            while not stop.is_set() and self.sent < limit:
                host, path = targets[k % len(targets)]
                k += 1
                self.sent += 1
                try:
                    async with session.get(url + path.rstrip("/") + "/x", headers={"Host": host}) as r:
                        await r.read()
                        if r.status != 200:
                            self._fail(f"{host}{path}: {r.status}")
                except (aiohttp.ClientError, OSError) as exc:
                    self._fail(f"{host}{path}: {exc!r}")

    def _fail(self, what: str) -> None:
        self.failed += 1
        if len(self.errors) < 10:
            self.errors.append(what)


class Probe:
    """Requests to the changed route, one after another: when did the new version answer."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.answers: list[tuple[float, str]] = []  # (time.time() at the answer, version)
        self.changed = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
            while not stop.is_set():
                async with session.get(self.url + "/probe", headers={"Host": PROBE}) as r:
                    await r.read()
                    self.answers.append((time.time(), r.headers.get("X-Canary-Version", "")))
                    self.changed.set()

    async def first(self, version: str, after: float, timeout: float = 10) -> float:
        async def scan() -> float:
            seen = 0
            while True:
                for at, answered in self.answers[seen:]:
                    if at >= after and answered == version:
                        return at
                seen = len(self.answers)
                self.changed.clear()
                await self.changed.wait()

        return await asyncio.wait_for(scan(), timeout)


def log_time(entry: dict[str, object]) -> float:
    """A log line's time: whole milliseconds, truncated, so up to 1 ms early."""
    stamp = str(entry["time"]).replace("Z", "+00:00")
    return datetime.datetime.fromisoformat(stamp).timestamp()


# -- the run ---------------------------------------------------------------------------------


@dataclass
class Change:
    seen_applied: float
    seen_answered: float
    write_answered: float
    read_applied: float


async def change_once(
    proxy: ProxyProcess, opens: DirectoryOpens, probe: Probe, path: Path, document: str, version: str
) -> Change:
    mark = len(proxy.logs)
    written = time.time()
    write_atomically(path, document)
    entry = await proxy.wait_log(lambda e: str(e.get("msg", "")).startswith("config loaded"), since=mark)
    answered = await probe.first(version, written)
    applied = log_time(entry)
    poll, read = opens.seen(written)
    return Change(applied - poll, answered - poll, answered - written, applied - read)


async def main(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="route-change-"))
    folder = tmp / "routes"
    folder.mkdir()
    stable, canary = await start_backend("stable"), await start_backend("canary")
    pairs = hosts_of(args.routes - 1, args.hosts)
    for k, (host, path) in enumerate(pairs):
        doc = route_document(stable, canary, host=host, path=path, weight=10)
        (folder / f"route-{k:05d}.yaml").write_text(doc)
    probe_file = folder / "probe.yaml"
    probe_file.write_text(route_document(stable, canary, host=PROBE, path="/", weight=0))
    proxy = await start_proxy(
        None, tmp, "--config-dir", str(folder), "--access-log", "off", use_config=False
    )  # fmt: skip
    load, probe, stop = Load(), Probe(proxy.url), asyncio.Event()
    targets = [pairs[k * len(pairs) // args.load_routes] for k in range(args.load_routes)]
    rng = random.Random(1)
    changes: list[Change] = []
    opens = DirectoryOpens(folder)
    started = time.monotonic()
    tasks = [
        asyncio.create_task(load.run(proxy.url, targets, stop, args.load_limit))
        for _ in range(args.concurrency)
    ]
    tasks.append(asyncio.create_task(probe.run(stop)))
    try:
        async with opens.watching():
            await probe.first("stable", 0)
            for i in range(args.changes):
                await asyncio.sleep(rng.uniform(0, POLL_INTERVAL))  # any phase against the poll
                weight, version = (100, "canary") if i % 2 == 0 else (0, "stable")
                doc = route_document(stable, canary, host=PROBE, path="/", weight=weight)
                changes.append(await change_once(proxy, opens, probe, probe_file, doc, version))
            stop.set()
            await asyncio.gather(*tasks)
    finally:
        stop.set()
        await stop_proxy(proxy)
        await asyncio.gather(*tasks, return_exceptions=True)
        await stable.stop()
        await canary.stop()
    report(args, changes, load, len(probe.answers), time.monotonic() - started)


def quantiles(values: list[float]) -> str:
    ms = sorted(v * 1000 for v in values)
    p99 = ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]
    return f"{statistics.median(ms):.0f} | {p99:.0f} | {ms[-1]:.0f}"


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def report(args: argparse.Namespace, changes: list[Change], load: Load, probed: int, seconds: float) -> None:
    rows: list[tuple[str, Callable[[Change], float]]] = [
        ("seen -> applied (poll that saw it -> `config loaded`)", lambda c: c.seen_applied),
        ("  of which: read start -> applied", lambda c: c.read_applied),
        ("seen -> first answer from the new version", lambda c: c.seen_answered),
        ("write -> first answer (includes the wait for the poll)", lambda c: c.write_answered),
    ]
    print_report(args, " in a --config-dir", changes, rows, load, probed, seconds)


T = TypeVar("T")  # what one change records


def print_report(
    args: argparse.Namespace,
    source: str,
    changes: Sequence[T],
    rows: list[tuple[str, Callable[[T], float]]],
    load: Load,
    probed: int,
    seconds: float,
) -> None:
    """The table of latencies (p50, p99, max of each row over the changes) and the background
    load's line, as both change-latency benchmarks print them."""
    print(f"{args.routes:,} routes over {args.hosts} hosts{source}; {len(changes)} changes of one "
          f"route's weight (0 <-> 100); load average at the start {args.loadavg}, "
          f"at the end {loadavg()}\n")  # fmt: skip
    print(f"| ms, over {len(changes)} changes | p50 | p99 | max |")
    print("|---|--:|--:|--:|")
    for label, get in rows:
        print(f"| {label} | {quantiles([get(c) for c in changes])} |")
    print(f"\nBackground: {load.sent:,} requests on {args.load_routes} routes at concurrency "
          f"{args.concurrency} ({load.sent / seconds:,.0f}/s), {load.failed} failed. The probe: {probed:,} "
          f"requests, one at a time ({probed / seconds:,.0f}/s).")  # fmt: skip
    for error in load.errors:
        print(f"  failed: {error}")


def parse_arguments(description: str, routes_help: str, changes: int) -> argparse.Namespace:
    """Both change-latency benchmarks' command line."""
    parser = argparse.ArgumentParser(description=description)
    routes = f"{routes_help}, the probe's included (1000)"
    parser.add_argument("--routes", type=int, default=1000, help=routes)
    parser.add_argument("--hosts", type=int, default=200, help="hosts they spread over (200)")
    parser.add_argument("--changes", type=int, default=changes, help=f"weight changes to time ({changes})")
    parser.add_argument("--load-routes", type=int, default=8, help="routes with background traffic (8)")
    parser.add_argument("--concurrency", type=int, default=8, help="background requests in flight (8)")
    parser.add_argument(
        "--load-limit", type=int, default=200_000, help="background requests at most, in all (200000)"
    )
    arguments = parser.parse_args()
    arguments.loadavg = loadavg()
    return arguments


if __name__ == "__main__":
    asyncio.run(main(parse_arguments(__doc__.splitlines()[0], "route files", 50)))
