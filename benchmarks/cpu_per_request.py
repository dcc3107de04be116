"""The proxy's CPU per request: user-space instructions and CPU time, counted, not timed.

Wall-clock benchmarks (``loadtests/bench.py``) move with whatever else the machine runs; the
instructions a process executes for a fixed amount of work barely do. This runs the real
proxy (``serve --workers 1``, access log on and written to a file, metrics on, as in
production) of the tree it is run from, and with ``--baseline-tree DIR`` of a second tree
(another git worktree, run with ``PYTHONPATH=DIR``), in front of two nginx backends that
answer 2 bytes from memory (``/small``, as in bench.py). wrk sends keep-alive requests over
``--connections`` connections until the backends' ``stub_status`` counted the run's share,
and the proxy's work over exactly those requests is counted twice:

- instructions: a second copy of each proxy runs under valgrind's callgrind (this machine's
  CPUs expose no hardware counters to ``perf``), its counters dumped before and after
  ``--instr-requests`` requests; deterministic to a fraction of a percent;
- CPU time: ``perf stat -e task-clock`` on the native proxy over ``--requests`` requests
  (user and kernel time, at full speed; a busy machine moves it by a few percent).

The trees take turns within each repeat; each figure is the median of ``--repeats`` runs.
On 2+ CPUs the proxies are pinned to CPU 1, wrk and the backends to CPU 0 (bench.py's
"pinned" section). At 64 connections each loop iteration handles many requests together,
as under the benchmark's load (under callgrind, as many as are ready: up to all 64). Needs
``valgrind``, ``perf``, ``wrk`` and ``nginx``. Every process it starts is stopped by pid.

    PYTHONPATH=. .venv/bin/python benchmarks/cpu_per_request.py [--baseline-tree ../wt-old]
        [--requests 20000] [--instr-requests 5000] [--connections 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

BACKEND_CONF = """
daemon off; master_process off; worker_processes 1; pid {dir}/nginx.pid;
error_log stderr error;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {dir}; proxy_temp_path {dir}; fastcgi_temp_path {dir};
  uwsgi_temp_path {dir}; scgi_temp_path {dir};
  keepalive_requests 1000000;
  server {{
    listen 127.0.0.1:{port};
    location = /small {{ return 200 "ok"; }}
    location = /nginx_status {{ stub_status; }}
  }}
}}
"""


@dataclass
class Proxy:
    """One running proxy: its port and pid, and the counted runs."""

    port: int
    pid: int
    per_request: list[float] = field(default_factory=list)


@dataclass
class Tree:
    label: str
    path: Path
    native: Proxy | None = None  # timed with perf's task-clock
    callgrind: Proxy | None = None  # its instructions counted

    def median(self, which: str) -> float:
        proxy = self.native if which == "cpu_us" else self.callgrind
        assert proxy is not None
        return statistics.median(proxy.per_request)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 180  # a proxy under callgrind takes ~20 s to start
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{what} did not start")
        time.sleep(0.2)


def pinned(cpu: int | None) -> list[str]:
    return ["taskset", "-c", str(cpu)] if cpu is not None else []


@contextlib.contextmanager
def started(argv: list[str], **kwargs: object) -> Iterator[subprocess.Popen[bytes]]:
    """A child process, stopped by its pid however the block ends."""
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, **kwargs)  # type: ignore[call-overload]
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class Backends:
    """The two nginx backends, and what they served (stub_status, each read included)."""

    def __init__(self, ports: list[int]) -> None:
        self.ports = ports

    def served(self) -> int:
        total = 0
        for port in self.ports:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/nginx_status", timeout=5) as response:
                total += int(response.read().decode().splitlines()[2].split()[2])
        return total

    def served_since(self, before: int) -> int:
        """Proxied requests since ``before`` (a ``served()``), this read's own not counted."""
        return self.served() - before - len(self.ports)


def start_backends(stack: contextlib.ExitStack, workdir: Path, cpu: int | None) -> Backends:
    ports = []
    for name in ("stable", "canary"):
        port, directory = free_port(), workdir / name
        directory.mkdir()
        (directory / "nginx.conf").write_text(BACKEND_CONF.format(dir=directory, port=port))
        argv = [*pinned(cpu), "nginx", "-p", str(directory), "-c", str(directory / "nginx.conf")]
        wait_port(port, stack.enter_context(started(argv)), f"nginx {name}")
        ports.append(port)
    return Backends(ports)


def start_proxy(
    stack: contextlib.ExitStack, tree: Path, config: Path, workdir: Path, *, cpu: int | None, under: list[str]
) -> Proxy:
    port = free_port()
    argv = [
        *pinned(cpu), *under, sys.executable, "-m", "canary_proxy", "serve", "--config", str(config),
        "--listen", f"127.0.0.1:{port}", "--admin-listen", "127.0.0.1:0", "--workers", "1",
        "--drain-delay", "0", "--shutdown-timeout", "2s",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(tree)}
    name = f"{workdir}/{port}"
    with open(f"{name}-access.log", "wb") as out, open(f"{name}-stderr.log", "wb") as err:
        proc = stack.enter_context(started(argv, cwd=tree, env=env, stdout=out, stderr=err))
    wait_port(port, proc, f"the proxy of {tree}")
    return Proxy(port, proc.pid)


def load(proxy: Proxy, requests: int, backends: Backends, args: argparse.Namespace) -> int:
    """wrk until the backends served ``requests`` more, then SIGINT, which ends it at once (wrk
    has no request count, and its Lua ``thread:stop`` waits out the duration); the requests
    proxied meanwhile, those still in flight at the end included."""
    before = backends.served()
    threads = min(2, args.connections)
    url = f"http://127.0.0.1:{proxy.port}/small"
    argv = [
        *pinned(args.load_cpu),
        "wrk",
        f"-t{threads}",
        f"-c{args.connections}",
        "-d600s",
        "--timeout",
        "60s",
        url,
    ]
    with started(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
        while backends.served_since(before) < requests:
            if proc.poll() is not None:
                raise SystemExit("wrk exited early")
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    text = out.decode(errors="replace")
    if "Non-2xx" in text or "Socket errors" in text:
        raise SystemExit(f"wrk saw errors:\n{text}")
    time.sleep(0.5)  # the requests cut by wrk's end finish, and are counted
    return backends.served_since(before)


def cpu_us(proxy: Proxy, backends: Backends, args: argparse.Namespace) -> float:
    """task-clock per request of one run, from ``perf stat`` attached to the native proxy."""
    argv = ["perf", "stat", "-x,", "-e", "task-clock", "-p", str(proxy.pid)]
    perf = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.3)  # perf attaches
        requests = load(proxy, args.requests, backends, args)
    finally:
        perf.send_signal(signal.SIGINT)
        _, err = perf.communicate(timeout=30)
    found = re.search(r"^([\d.]+),msec,task-clock", err, re.M)
    if found is None:
        raise SystemExit(f"perf stat counted nothing (kernel.perf_event_paranoid?):\n{err}")
    return float(found.group(1)) * 1e3 / requests


def instructions(proxy: Proxy, backends: Backends, args: argparse.Namespace, out: Path) -> float:
    """Instructions per request of one run: callgrind's counters are zeroed by a dump before
    it, and dumped again after it (each dump holds the cost since the one before)."""
    subprocess.run(["callgrind_control", "-d", str(proxy.pid)], check=True, capture_output=True)
    requests = load(proxy, args.instr_requests, backends, args)
    dumps = set(out.parent.glob(out.name + ".*"))
    subprocess.run(["callgrind_control", "-d", str(proxy.pid)], check=True, capture_output=True)
    (latest,) = set(out.parent.glob(out.name + ".*")) - dumps
    found = re.search(r"^totals: (\d+)", latest.read_text(), re.M)
    assert found is not None, latest
    return int(found.group(1)) / requests


def run(args: argparse.Namespace) -> list[Tree]:
    trees = [Tree("this tree", ROOT)]
    if args.baseline_tree is not None:
        trees.append(Tree("baseline", args.baseline_tree.resolve()))
    with tempfile.TemporaryDirectory(prefix="cpu-per-request-") as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        backends = start_backends(stack, workdir, args.load_cpu)
        stable, canary = backends.ports
        config = workdir / "canary.yaml"
        config.write_text(
            f"stable-url: http://127.0.0.1:{stable}\ncanary-url: http://127.0.0.1:{canary}\n"
            "canary-weight: 10\ncanary-by-header: X-Canary\n"
            "upstream-connect-timeout: 30s\n"  # under callgrind on a busy machine, 2 s can pass
        )
        outs = {}
        for k, tree in enumerate(trees):
            outs[k] = workdir / f"callgrind-{k}.out"
            under = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={outs[k]}"]
            tree.native = start_proxy(stack, tree.path, config, workdir, cpu=args.proxy_cpu, under=[])
            tree.callgrind = start_proxy(stack, tree.path, config, workdir, cpu=args.proxy_cpu, under=under)
            load(tree.native, args.requests // 4, backends, args)  # warm-up: pools, caches
            load(tree.callgrind, args.connections * 4, backends, args)
        for _ in range(args.repeats):
            for k, tree in enumerate(trees):
                assert tree.native is not None and tree.callgrind is not None
                tree.native.per_request.append(cpu_us(tree.native, backends, args))
                tree.callgrind.per_request.append(instructions(tree.callgrind, backends, args, outs[k]))
    return trees


def report(trees: list[Tree], args: argparse.Namespace) -> None:
    print(
        f"GET /small (2 B), wrk -c{args.connections}; instructions over ~{args.instr_requests} requests "
        f"(callgrind), CPU time over ~{args.requests} (perf task-clock); median of {args.repeats}; "
        f"proxy on CPU {args.proxy_cpu}, load on CPU {args.load_cpu}"
    )
    for tree in trees:
        assert tree.native is not None and tree.callgrind is not None
        runs = ", ".join(
            f"{i:,.0f}/{t:.1f}"
            for i, t in zip(tree.callgrind.per_request, tree.native.per_request, strict=True)
        )
        print(
            f"{tree.label:>10} {tree.path}: {tree.median('instructions'):,.0f} instructions/request, "
            f"{tree.median('cpu_us'):.2f} µs CPU/request  (runs: {runs})"
        )
    if len(trees) == 2:
        ratios = (trees[0].median(a) / trees[1].median(a) for a in ("instructions", "cpu_us"))
        print("this tree / baseline: instructions {:.3f}, CPU time {:.3f}".format(*ratios))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline-tree", type=Path, help="another checkout to compare with")
    parser.add_argument("--requests", type=int, default=20000, help="per CPU-time run (default 20000)")
    parser.add_argument(
        "--instr-requests", type=int, default=5000, help="per instruction-count run (default 5000)"
    )
    parser.add_argument("--connections", type=int, default=64, help="wrk connections (default 64)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per tree (default 3)")
    args = parser.parse_args()
    for tool in ("valgrind", "callgrind_control", "perf", "wrk", "nginx"):
        if shutil.which(tool) is None:
            parser.error(f"needs {tool}")
    two_cpus = len(os.sched_getaffinity(0)) >= 2
    args.proxy_cpu, args.load_cpu = (1, 0) if two_cpus else (None, None)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: every child is stopped
    report(run(args), args)


if __name__ == "__main__":
    main()
