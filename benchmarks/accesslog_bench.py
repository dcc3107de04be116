"""What the JSON access log costs: proxy throughput with ``--access-log on`` and ``off``.

Runs the real proxy (``serve --workers 1``) in front of one backend and drives it with wrk
for ``--duration`` seconds per run, access log on and off taking turns ``--repeats`` times
(so machine noise hits both alike); prints the median req/s and latency of each and the
difference. With the log on, stdout goes to a file, as a container runtime would take it,
and the script checks it holds one line per request.

The backend is nginx answering a 2-byte body from memory (never the bottleneck); without
nginx, the tests' aiohttp echo backend. On 2+ CPUs the proxy is pinned to CPU 1 and wrk and
the backend to CPU 0: one core of proxy, measured. Needs the Debian package ``wrk``
(``nginx`` recommended). Every process it starts is stopped by pid. Usage:

    .venv/bin/python benchmarks/accesslog_bench.py [--duration 5] [--repeats 3] [--connections 32]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

NGINX_CONF = """
daemon off; master_process off; worker_processes 1; pid {dir}/nginx.pid;
error_log stderr error;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {dir}; proxy_temp_path {dir}; fastcgi_temp_path {dir};
  uwsgi_temp_path {dir}; scgi_temp_path {dir};
  keepalive_requests 1000000;
  server {{ listen 127.0.0.1:{port}; location / {{ return 200 "ok"; }} }}
}}
"""


@dataclass
class Result:
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_us: float = 0.0  # the proxy's CPU time per request: robust to a busy machine


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pin(pid: int, cpu: int | None) -> None:
    if cpu is not None:
        os.sched_setaffinity(pid, {cpu})


@contextlib.contextmanager
def nginx_backend(workdir: Path, cpu: int | None) -> Iterator[str]:
    port = free_port()
    conf = workdir / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=workdir, port=port))
    proc = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(workdir)])
    try:
        pin(proc.pid, cpu)
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("nginx did not start")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


@contextlib.contextmanager
def python_backend(cpu: int | None) -> Iterator[str]:
    """The tests' echo backend, in a child process with its own event loop."""
    code = (
        "import asyncio, sys\n"
        "from tests.conftest import start_backend\n"
        "async def main():\n"
        "    b = await start_backend('stable')\n"
        "    print(b.url, flush=True)\n"
        "    await asyncio.Event().wait()\n"
        "asyncio.run(main())\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        pin(proc.pid, cpu)
        assert proc.stdout is not None
        yield proc.stdout.readline().strip()
    finally:
        proc.terminate()
        proc.wait(10)


@contextlib.contextmanager
def proxy(
    backend: str, workdir: Path, *, access_log: bool, cpu: int | None
) -> Iterator[tuple[str, Path, int]]:
    config = workdir / "canary.yaml"
    config.write_text(json.dumps({"stable-url": backend, "canary-url": backend, "canary-weight": 10}))
    run_id = f"{'on' if access_log else 'off'}-{time.monotonic_ns()}"
    out, err = workdir / f"access-{run_id}.log", workdir / f"app-{run_id}.log"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "canary_proxy", "serve", "--config", str(config),
                "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--drain-delay", "0",
                "--access-log", "on" if access_log else "off",
            ],
            cwd=ROOT, stdout=stdout, stderr=stderr,
        )  # fmt: skip
    try:
        pin(proc.pid, cpu)
        yield "http://" + _ready(proc, err)["public"], out, proc.pid
    finally:
        proc.terminate()
        proc.wait(30)


def _ready(proc: subprocess.Popen[bytes], log: Path) -> dict[str, str]:
    """The proxy's ``ready`` log line (JSON on stderr), which names its public address."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        for line in log.read_text().splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if entry.get("msg") == "ready":
                    return dict(entry)
        if proc.poll() is not None:
            raise SystemExit(f"the proxy exited: {log.read_text()}")
        time.sleep(0.05)
    raise SystemExit("the proxy did not get ready")


def wrk(url: str, *, duration: float, connections: int, cpu: int | None) -> Result:
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{duration:g}s", "--latency", url + "/"]
    if cpu is not None:
        argv = ["taskset", "-c", str(cpu), *argv]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=duration + 60).stdout
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    return Result(requests, rps, _latency(out, "50%"), _latency(out, "99%"))


def _latency(out: str, pct: str) -> float:
    m = re.search(rf"^\s+{re.escape(pct)}\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
    assert m is not None, out
    return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]


def run(args: argparse.Namespace) -> None:
    if shutil.which("wrk") is None:
        raise SystemExit("needs wrk: apt-get install -y wrk")
    two_cpus = len(os.sched_getaffinity(0)) >= 2
    proxy_cpu, load_cpu = (1, 0) if two_cpus else (None, None)
    results: dict[bool, list[Result]] = {True: [], False: []}
    with tempfile.TemporaryDirectory(prefix="accesslog-bench-") as tmp:
        workdir = Path(tmp)
        use_nginx = shutil.which("nginx") is not None
        backend_cm = nginx_backend(workdir, load_cpu) if use_nginx else python_backend(load_cpu)
        with backend_cm as backend:
            for _ in range(args.repeats):
                for access_log in (True, False):
                    with proxy(backend, workdir, access_log=access_log, cpu=proxy_cpu) as (url, out, pid):
                        wrk(url, duration=1, connections=args.connections, cpu=load_cpu)  # warm-up
                        before, cpu = _lines(out), cpu_seconds(pid)
                        result = wrk(url, duration=args.duration, connections=args.connections, cpu=load_cpu)
                        result.cpu_us = (cpu_seconds(pid) - cpu) / result.requests * 1e6
                        logged = _lines(out) - before
                    if access_log:
                        # wrk counts completed responses; requests cut at the end of this run
                        # and of the warm-up are logged too: up to one per connection each.
                        assert result.requests <= logged <= result.requests + 2 * args.connections, (
                            result.requests,
                            logged,
                        )
                    else:
                        assert logged == 0
                    results[access_log].append(result)
    _report(args, results, "nginx" if use_nginx else "aiohttp echo", two_cpus)


def _lines(path: Path) -> int:
    with path.open("rb") as f:
        return sum(1 for _ in f)


def _report(args: argparse.Namespace, results: dict[bool, list[Result]], backend: str, pinned: bool) -> None:
    def med(on: bool, attr: str) -> float:
        return statistics.median(getattr(r, attr) for r in results[on])

    on, off = med(True, "rps"), med(False, "rps")
    print(f"backend: {backend}; proxy: --workers 1{', pinned to CPU 1' if pinned else ''}; "
          f"wrk -t1 -c{args.connections} -d{args.duration:g}s; median of {args.repeats}")  # fmt: skip
    print("| access log | req/s | p50 ms | p99 ms | proxy CPU µs/request |")
    print("|---|---:|---:|---:|---:|")
    for flag in (True, False):
        print(
            f"| {'on' if flag else 'off'} | {med(flag, 'rps'):,.0f} | "
            f"{med(flag, 'p50_ms'):.2f} | {med(flag, 'p99_ms'):.2f} | {med(flag, 'cpu_us'):.1f} |"
        )
    cpu_on, cpu_off = med(True, "cpu_us"), med(False, "cpu_us")
    print(
        f"access log on: {100 * (off - on) / off:+.1f} % req/s lost, "
        f"{cpu_on - cpu_off:+.1f} µs ({100 * (cpu_on - cpu_off) / cpu_off:+.1f} %) proxy CPU per request"
    )
    print("runs (req/s):", {("on" if k else "off"): [round(r.rps) for r in v] for k, v in results.items()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--connections", type=int, default=32)
    run(parser.parse_args())


if __name__ == "__main__":
    main()
