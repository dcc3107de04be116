"""Route lookup cost: one catch-all route against 1,000 routes over 200 hosts, in one run.

The data path looks a route up once per request (``RouteTable.value_for``, from the raw
Host header and target). This measures that call alone, in the same process and run for
every table, and prints each against the one-route reference: the lookup must not grow
with the number of routes, only with the number of path segments a request has. In a tight
loop the tables stay in the CPU caches; in the proxy, with traffic over 1,000 routes, they
do not (docs/performance.md measures both).

    .venv/bin/python benchmarks/route_lookup.py [--lookups 200000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable

from canary_proxy.routes import Route, RouteTable, parse_route, request_host, request_path

UPSTREAMS = {"stable-url": "http://127.0.0.1:8001", "canary-url": "http://127.0.0.1:8002"}


def make_routes(hosts: int, per_host: int) -> list[Route]:
    """``hosts`` hosts with ``per_host`` prefix routes each (/, /api, /api/v1, ...)."""
    routes = []
    for h in range(hosts):
        for p in range(per_host):
            path = "/" if p == 0 else "/" + "/".join(f"s{i}" for i in range(p))
            raw = {**UPSTREAMS, "host": f"svc{h}.example.com", "path": path}
            routes.append(parse_route(raw, name=f"r{h}-{p}", order=(h, p)))
    return routes


def timed(lookup: Callable[[], object], count: int) -> float:
    start = time.perf_counter()
    for _ in range(count):
        lookup()
    return (time.perf_counter() - start) / count * 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lookups", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rng = random.Random(1)
    single = RouteTable([(Route.default(make_routes(1, 1)[0].config), "default")])
    many = RouteTable((r, r.name) for r in make_routes(200, 5))
    hosts = [f"svc{rng.randrange(200)}.example.com:8080".encode() for _ in range(1024)]
    many.build()

    def one() -> object:
        return single.only

    def deep() -> object:  # the data path's: the raw Host header and target
        return many.value_for(hosts[rng.randrange(1024)], b"/s0/s1/x?q=1")

    def parsed_first() -> object:  # the route-for and explain lookup, Host and path parsed first
        return many.lookup(request_host(hosts[rng.randrange(1024)]), request_path(b"/s0/s1/x?q=1"))

    rows = []
    for label, fn in (("1 catch-all route", one), ("1,000 routes / 200 hosts (value_for)", deep),
                      ("1,000 routes (request_host, request_path, lookup)", parsed_first)):  # fmt: skip
        samples = [timed(fn, args.lookups) for _ in range(args.repeats)]
        rows.append((label, statistics.median(samples)))
    print(f"| table | ns per lookup (median of {args.repeats} x {args.lookups:,}) |")
    print("|---|--:|")
    for label, ns in rows:
        print(f"| {label} | {ns:,.0f} |")
    print(f"\n{len(many.routes)} routes, {len(many.conflicts)} conflicts; "
          "the random host draw itself is in the 1,000-route rows")  # fmt: skip


if __name__ == "__main__":
    main()
