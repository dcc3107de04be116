"""Benchmark canary-proxy against nginx and the bare backend, in one invocation, on one machine.

Three targets behind the same wrk and the same backends:

- **backend direct**: wrk to the stable backend, no proxy: the ceiling of the rig;
- **nginx**: the reference, ``split_clients`` on ``$request_id`` (``$remote_addr`` would put
  all loopback traffic in one bucket) over upstreams with keep-alive, ``proxy_buffering off``
  as ingress-nginx sets it (streaming, like canary-proxy) with 64 KiB reads, an access log
  on, ``X-Forwarded-*``/``X-Request-Id`` set and the version returned in a header, like
  canary-proxy;
- **canary-proxy**: ``canary-proxy serve`` with its access log on (written to a file) and
  its metrics on, as in production.

The backends are two nginx servers (stable and canary) that answer fixed bodies of 2 B,
16 KiB and 1 MiB from memory or the page cache, so they are never the bottleneck; each
counts its requests (``stub_status``), which gives the observed split. The canary weight is
10 %. wrk runs with ``--latency``: req/s and p50/p99 at 64 connections, p50/p99 at one.

Two sections. *Pinned*: the proxy (canary-proxy ``--workers 1``, then nginx
``worker_processes 1``) on CPU 1, wrk and the backends on CPU 0: one core against one core.
*Unpinned*: canary-proxy ``--workers auto`` against nginx ``worker_processes auto``, nothing
pinned. The proxy's CPU time per request comes from ``/proc/<pid>/stat`` (utime + stime,
summed over all its processes) across each run. Every cell is the median of ``--repeats``
runs; the targets take turns within each repeat so machine noise hits them alike. Prints a
Markdown table for the README, with the machine and the exact command line. Every process
it starts is stopped by pid, on errors and Ctrl-C too.

*Many routes* (``--routes N --hosts H``): a second canary-proxy serves N routes over H hosts
(``--routes-from dir``: one file each in a ``--config-dir``, watched live as in production;
``file``: one file of N YAML documents), every one pointing at the same backends, next to the
one-route canary-proxy, in the same run. Each host has N/H prefix routes, ``/`` and ``/r1``
... ``/rK``; wrk sends its requests round-robin over every (Host, path) pair of them (a Lua
script; the backends strip the ``/rK`` prefix), to every target alike, so the two
canary-proxies differ only in their routes. A request for ``/`` scans all of its host's
candidates before it matches. nginx keeps its single config, for reference.

*HTTPS* (``--https``): nginx and canary-proxy (``--tls-cert``/``--tls-key``) terminate TLS
with the same certificate (a self-signed ECDSA P-256 one, made for the run), both with their
default session settings; the backends stay plain HTTP, as behind an Ingress controller. The
bodies are then ``small`` (keep-alive requests over TLS) and ``handshake`` (the same request
with ``Connection: close``: one new TCP connection and TLS handshake per request, so its req/s
are handshakes per second), and the report gives both ratios to nginx; the target is 0.4x
nginx or more on keep-alive HTTPS.

    .venv/bin/python loadtests/bench.py [--duration 10] [--repeats 3] [--quick] [--routes 1000 --hosts 200]
    .venv/bin/python loadtests/bench.py --https [--sections pinned]

Needs the Debian packages ``nginx`` and ``wrk``, and 2+ CPUs for the pinned section.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.metadata
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from canary_checks import bernstein_tolerance  # loadtests/ is not a package

ROOT = Path(__file__).resolve().parent.parent
CANARY_WEIGHT = 10  # percent
BODIES = {
    "small": ("/small", "2 B"),
    "16k": ("/16k", "16 KiB"),
    "1m": ("/1m", "1 MiB"),
    "handshake": ("/small", "2 B, new TLS connection each"),  # --https: Connection: close
}
HTTPS_TARGET = 0.4  # the issue's: keep-alive HTTPS req/s at least 0.4x nginx's
CONNECTIONS = (64, 1)
TARGETS = ("direct", "nginx", "canary-proxy")
TARGET_LABELS = {"direct": "backend direct", "nginx": "nginx", "canary-proxy": "canary-proxy"}
ROUTES_TARGET = "canary-proxy-routes"  # --routes: the same proxy serving N routes
ROUTES_TARGET_MAX_LOSS = 0.10  # the target: N routes within 10 % of one route's req/s
CLK_TCK = os.sysconf("SC_CLK_TCK")
STOP_GRACE = 10.0  # seconds between SIGTERM and SIGKILL
SPLIT_DELTA = 1e-6


class BenchError(Exception):
    pass


# -- processes -------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat from field 3 (state) on: the command name may hold spaces."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text.rpartition(")")[2].split()


def descendants(root: int) -> list[int]:
    """``root`` and every process below it, found by parent pid."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat_fields(int(entry))) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of these processes (field 14 and 15 of /proc/<pid>/stat)."""
    ticks = 0
    for pid in pids:
        if (fields := _stat_fields(pid)) is not None:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / CLK_TCK


def _start_time(pid: int) -> str | None:
    fields = _stat_fields(pid)
    return fields[19] if fields is not None else None  # field 22: start time, tells reused pids apart


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.popen.pid

    def tree(self) -> list[int]:
        return descendants(self.pid)


class Processes:
    """Every process started; each stopped by pid: SIGTERM, then SIGKILL for the whole tree."""

    def __init__(self) -> None:
        self.running: list[Proc] = []

    def start(self, name: str, argv: list[str], **kwargs: Any) -> Proc:
        proc = Proc(name, subprocess.Popen(argv, stdin=subprocess.DEVNULL, **kwargs))
        self.running.append(proc)
        return proc

    def stop(self, proc: Proc) -> None:
        tree = [(pid, _start_time(pid)) for pid in proc.tree()]
        if proc.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.popen.wait(STOP_GRACE)
        except subprocess.TimeoutExpired:
            pass
        for pid, started in tree:  # the children too: a killed nginx master leaves its workers
            if started is not None and _start_time(pid) == started:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        proc.popen.wait(STOP_GRACE)
        self.running.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.running)):
            self.stop(proc)


def pinned(cpu: str | None) -> list[str]:
    return ["taskset", "-c", cpu] if cpu is not None else []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_until(check: Callable[[], Any], proc: Proc, what: str, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if (result := check()) is not None:
                return result
        if proc.popen.poll() is not None:
            raise BenchError(f"{what} exited with {proc.popen.returncode}")
        time.sleep(0.05)
    raise BenchError(f"{what} did not start within {timeout:.0f}s")


def port_open(port: int) -> bool | None:
    with socket.create_connection(("127.0.0.1", port), timeout=1):
        return True


# -- nginx: the backends and the reference proxy ------------------------------------------------

NGINX_COMMON = """
daemon off;
worker_processes {workers};
error_log {dir}/error.log warn;
pid {dir}/nginx.pid;
events {{ worker_connections 8192; }}
"""
HTTP_COMMON = """
    client_body_temp_path {dir}/body; proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi; uwsgi_temp_path {dir}/uwsgi; scgi_temp_path {dir}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
"""

BACKEND_CONF = (
    NGINX_COMMON
    + """
http {{
    access_log off;
    sendfile on;
    default_type application/octet-stream;
""".rstrip("\n")
    + HTTP_COMMON
    + """
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        root {www};
        location = /small {{ return 200 "ok"; }}
        location = /nginx_status {{ stub_status; }}{rewrite}
    }}
}}
"""
)

PROXY_CONF = (
    NGINX_COMMON
    + """
http {{
    log_format canary '$remote_addr [$time_local] "$request" $status $body_bytes_sent '
                      '$request_time $upstream_addr $canary_upstream $request_id';
    access_log {dir}/access.log canary;
""".rstrip("\n")
    + HTTP_COMMON
    + """
    split_clients "${{request_id}}" $canary_upstream {{
        {weight}% canary;
        * stable;
    }}
    upstream stable {{ server 127.0.0.1:{stable}; keepalive 128; keepalive_requests 1000000; }}
    upstream canary {{ server 127.0.0.1:{canary}; keepalive 128; keepalive_requests 1000000; }}
    server {{
        listen 127.0.0.1:{port} backlog=4096 reuseport{ssl};{tls}
        location / {{
            proxy_pass http://$canary_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $http_host;
            proxy_set_header X-Request-Id $request_id;
            # Stream as canary-proxy does (and as ingress-nginx sets it), reading up to 64 KiB
            # at a time: the 4 KiB default costs nginx 2.5x the CPU on a 1 MiB body.
            proxy_buffering off;
            proxy_buffer_size 64k;
            proxy_buffers 8 64k;
            proxy_busy_buffers_size 128k;
            add_header X-Canary-Version $canary_upstream always;
            add_header X-Request-Id $request_id always;
        }}
    }}
}}
"""
)


def start_nginx(procs: Processes, name: str, conf: str, directory: Path, cpu: str | None) -> Proc:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "nginx.conf").write_text(conf)
    argv = [
        *pinned(cpu), "nginx", "-p", str(directory), "-c", str(directory / "nginx.conf"),
        "-e", str(directory / "error.log"),
    ]  # fmt: skip
    with (directory / "stderr.log").open("wb") as log:
        return procs.start(name, argv, stdout=log, stderr=subprocess.STDOUT)


@dataclass
class Backend:
    name: str
    port: int
    proc: Proc

    def served(self) -> int:
        """stub_status's request count, which already includes this very read."""
        url = f"http://127.0.0.1:{self.port}/nginx_status"
        with urllib.request.urlopen(url, timeout=5) as response:
            lines = response.read().decode().splitlines()
        return int(lines[2].split()[2])


# --routes: /rK/small is the route /rK's request for /small; the backends drop the prefix.
ROUTE_PREFIX_REWRITE = "\n        rewrite ^/r[0-9]+(/.*)$ $1 last;"


def start_backends(
    procs: Processes, workdir: Path, *, route_prefixes: bool = False
) -> tuple[Backend, Backend]:
    www = workdir / "www"
    www.mkdir()
    (www / "16k").write_bytes(b"x" * 16384)
    (www / "1m").write_bytes(b"x" * 1048576)
    for path in (workdir, www, www / "16k", www / "1m"):
        path.chmod(0o755)  # nginx workers run as nobody when we are root
    backends = []
    for name in ("stable", "canary"):
        port = free_port()
        directory = workdir / f"backend-{name}"
        rewrite = ROUTE_PREFIX_REWRITE if route_prefixes else ""
        conf = BACKEND_CONF.format(workers=1, dir=directory, port=port, www=www, rewrite=rewrite)
        proc = start_nginx(procs, f"backend-{name}", conf, directory, cpu=None)
        wait_until(functools.partial(port_open, port), proc, f"backend {name}")
        backends.append(Backend(name, port, proc))
    return backends[0], backends[1]


def set_affinity(proc: Proc, cpu: str | None) -> None:
    cpus = {int(cpu)} if cpu is not None else set(range(os.cpu_count() or 1))
    for pid in proc.tree():
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(pid, cpus)


# -- the proxies under test -----------------------------------------------------------------


@dataclass
class Target:
    name: str
    url: str
    proc: Proc | None = None  # the proxy whose CPU is measured; None for the backend itself
    logs: list[Path] = field(default_factory=list)  # access logs, truncated after each run


@dataclass(frozen=True)
class Tls:
    """--https: the one certificate both proxies serve."""

    cert: Path
    key: Path

    @classmethod
    def make(cls, workdir: Path) -> Tls:
        sys.path.insert(0, str(ROOT))
        from canary_proxy.selfsigned import fake_certificate  # ECDSA P-256, self-signed

        cert, key = fake_certificate()
        paths = cls(workdir / "tls.crt", workdir / "tls.key")
        paths.cert.write_bytes(cert)
        paths.key.write_bytes(key)
        for path in (paths.cert, paths.key):
            path.chmod(0o644)  # nginx reads them as root; canary-proxy as us
        return paths

    def nginx(self) -> str:
        return (
            f"\n        ssl_certificate {self.cert};\n        ssl_certificate_key {self.key};"
            "\n        ssl_protocols TLSv1.2 TLSv1.3;"
        )


def start_nginx_proxy(
    procs: Processes,
    workdir: Path,
    backends: tuple[Backend, Backend],
    *,
    workers: str,
    cpu: str | None,
    tls: Tls | None = None,
) -> Target:
    port = free_port()
    directory = workdir / f"nginx-proxy-{workers}"
    conf = PROXY_CONF.format(
        workers=workers,
        dir=directory,
        port=port,
        weight=CANARY_WEIGHT,
        stable=backends[0].port,
        canary=backends[1].port,
        ssl=" ssl" if tls else "",
        tls=tls.nginx() if tls else "",
    )
    proc = start_nginx(procs, "nginx-proxy", conf, directory, cpu)
    wait_until(lambda: port_open(port), proc, "nginx proxy")
    scheme = "https" if tls else "http"
    return Target("nginx", f"{scheme}://127.0.0.1:{port}", proc, [directory / "access.log"])


@dataclass(frozen=True)
class RouteLayout:
    """``--routes N --hosts H``: route k is on host ``h{k % H}.bench.test``, path ``/`` for the
    first H routes and ``/r{k // H}`` (a prefix) after them."""

    routes: int
    hosts: int
    source: str  # "dir" (--config-dir, one file per route) or "file" (one file, N documents)

    def pairs(self) -> list[tuple[str, str]]:
        """Each route's (Host, path prefix of its requests): "" for the ``/`` routes."""
        return [(f"h{k % self.hosts}.bench.test", f"/r{k // self.hosts}" if k >= self.hosts else "")
                for k in range(self.routes)]  # fmt: skip

    def documents(self, backends: tuple[Backend, Backend]) -> list[str]:
        return [
            f"host: {host}\npath: {prefix or '/'}\n" + pair_config(backends) for host, prefix in self.pairs()
        ]

    def lua(self) -> str:
        """A wrk script: every request round-robin over the routes' (Host, path) pairs, each
        request built once in ``init``, so wrk's per-request cost is one table read."""
        pairs = ",\n".join(f'  {{"{host}", "{prefix}"}}' for host, prefix in self.pairs())
        return (
            f"local pairs = {{\n{pairs}\n}}\n"
            "local requests, i = {}, 0\n"
            "function init(args)\n"
            "  for k, pair in ipairs(pairs) do\n"
            '    requests[k] = wrk.format("GET", pair[2] .. wrk.path, {Host = pair[1]})\n'
            "  end\n"
            "end\n"
            "function request()\n"
            "  i = i % #requests + 1\n"
            "  return requests[i]\n"
            "end\n"
        )

    def label(self) -> str:
        return f"canary-proxy, {self.routes:,} routes / {self.hosts} hosts ({self.source})"


def pair_config(backends: tuple[Backend, Backend]) -> str:
    return (
        f"stable-url: http://127.0.0.1:{backends[0].port}\n"
        f"canary-url: http://127.0.0.1:{backends[1].port}\n"
        f"canary-weight: {CANARY_WEIGHT}\n"
        "canary-by-header: X-Canary\n"
    )


def start_canary_proxy(
    procs: Processes,
    workdir: Path,
    backends: tuple[Backend, Backend],
    *,
    workers: str,
    cpu: str | None,
    layout: RouteLayout | None = None,
    tls: Tls | None = None,
) -> Target:
    """One catch-all route (today's config), or ``layout``'s routes."""
    name = "canary-proxy" if layout is None else ROUTES_TARGET
    directory = workdir / f"{name}-{workers}"
    directory.mkdir()
    if layout is None:
        config = directory / "canary.yaml"
        config.write_text(pair_config(backends))
        source = ["--config", str(config)]
    elif layout.source == "dir":
        routes = directory / "routes"
        routes.mkdir()
        for k, document in enumerate(layout.documents(backends)):
            (routes / f"route-{k:05d}.yaml").write_text(document)
        source = ["--config-dir", str(routes)]
    else:
        config = directory / "routes.yaml"
        config.write_text("---\n".join(layout.documents(backends)))
        source = ["--config", str(config)]
    access, stderr = directory / "access.log", directory / "stderr.log"
    argv = [
        *pinned(cpu), sys.executable, "-m", "canary_proxy", "serve", *source,
        "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--workers", workers,
        "--drain-delay", "0", "--shutdown-timeout", "2s",
        *(["--tls-cert", str(tls.cert), "--tls-key", str(tls.key)] if tls else []),
    ]  # fmt: skip
    # O_APPEND, so truncating the file between runs keeps disk use flat while it stays on.
    with access.open("ab") as out, stderr.open("ab") as err:
        proc = procs.start("canary-proxy", argv, stdout=out, stderr=err, cwd=ROOT)

    def ready() -> dict[str, Any] | None:
        for line in stderr.read_text().splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if entry.get("msg") == "ready":
                    return dict(entry)
        return None

    entry = wait_until(ready, proc, name)
    return Target(name, ("https://" if tls else "http://") + entry["public"], proc, [access])


# -- wrk -------------------------------------------------------------------------------------

_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


@dataclass
class WrkResult:
    rps: float
    p50: float  # seconds
    p99: float
    requests: int
    errors: int  # socket errors and non-2xx/3xx answers
    error_text: str = ""


def _seconds(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        raise BenchError(f"cannot read wrk latency {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(out: str) -> WrkResult:
    def find(pattern: str) -> re.Match[str]:
        m = re.search(pattern, out, re.MULTILINE)
        if m is None:
            raise BenchError(f"cannot read wrk output ({pattern!r}):\n{out}")
        return m

    errors, notes = 0, []
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        errors += sum(int(x) for x in m.groups())
        notes.append(m.group(0))
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        errors += int(m.group(1))
        notes.append(m.group(0))
    return WrkResult(
        rps=float(find(r"^Requests/sec:\s+([\d.]+)").group(1)),
        p50=_seconds(find(r"^\s+50%\s+(\S+)").group(1)),
        p99=_seconds(find(r"^\s+99%\s+(\S+)").group(1)),
        requests=int(find(r"^\s+(\d+) requests in").group(1)),
        errors=errors,
        error_text="; ".join(notes),
    )


def run_wrk(
    procs: Processes,
    url: str,
    *,
    connections: int,
    threads: int,
    duration: float,
    cpu: str | None,
    script: Path | None = None,
    close: bool = False,
) -> WrkResult:
    """``close``: one request per connection (``Connection: close``), so over TLS each
    request is a new handshake."""
    argv = [
        *pinned(cpu), "wrk", f"-t{min(threads, connections)}", f"-c{connections}",
        f"-d{duration:g}s", "--latency", *(["-s", str(script)] if script is not None else []),
        *(["-H", "Connection: close"] if close else []), url,
    ]  # fmt: skip
    proc = procs.start("wrk", argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out, _ = proc.popen.communicate(timeout=duration + 30)
    except subprocess.TimeoutExpired:
        raise BenchError(f"wrk on {url} did not finish") from None
    finally:
        procs.stop(proc)
    if proc.popen.returncode != 0:
        raise BenchError(f"wrk failed on {url}:\n{out.decode(errors='replace')}")
    return parse_wrk(out.decode(errors="replace"))


# -- one section -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Section:
    key: str
    title: str
    proxy_cpu: str | None  # taskset for the proxy under test
    load_cpu: str | None  # taskset for wrk and the backends
    workers: str  # canary-proxy --workers; nginx worker_processes
    wrk_threads: int


@dataclass
class Run:
    section: str
    target: str
    body: str
    connections: int
    repeat: int
    rps: float
    p50: float
    p99: float
    requests: int
    errors: int
    cpu_per_request: float | None  # seconds
    stable: int | None  # requests the backends counted during the run
    canary: int | None


def measure(
    procs: Processes,
    section: Section,
    target: Target,
    backends: tuple[Backend, Backend],
    *,
    body: str,
    connections: int,
    repeat: int,
    duration: float,
    script: Path | None,
) -> Run:
    tree = target.proc.tree() if target.proc is not None else []
    before = (cpu_seconds(tree), backends[0].served(), backends[1].served())
    result = run_wrk(
        procs,
        target.url + BODIES[body][0],
        connections=connections,
        threads=section.wrk_threads,
        duration=duration,
        cpu=section.load_cpu,
        script=script,
        close=body == "handshake",
    )
    after = (cpu_seconds(tree), backends[0].served(), backends[1].served())
    for log in target.logs:
        with contextlib.suppress(FileNotFoundError):
            os.truncate(log, 0)
    proxied = target.proc is not None
    if result.errors:
        print(f"  ! {target.name} {body} @{connections}: {result.error_text}", file=sys.stderr)
    return Run(
        section=section.key,
        target=target.name,
        body=body,
        connections=connections,
        repeat=repeat,
        rps=result.rps,
        p50=result.p50,
        p99=result.p99,
        requests=result.requests,
        errors=result.errors,
        cpu_per_request=(after[0] - before[0]) / result.requests if proxied and result.requests else None,
        # Less one: the "before" status read itself is counted in the "after" figure.
        stable=after[1] - before[1] - 1 if proxied else None,
        canary=after[2] - before[2] - 1 if proxied else None,
    )


def layout_of(args: argparse.Namespace) -> RouteLayout | None:
    return RouteLayout(args.routes, args.hosts, args.routes_from) if args.routes else None


def target_names(layout: RouteLayout | None) -> tuple[str, ...]:
    return TARGETS if layout is None else (*TARGETS, ROUTES_TARGET)


def target_label(name: str, layout: RouteLayout | None) -> str:
    if name == ROUTES_TARGET and layout is not None:
        return layout.label()
    return TARGET_LABELS[name] + (", 1 route" if name == "canary-proxy" and layout is not None else "")


@contextlib.contextmanager
def paused(proc: Proc) -> Iterator[None]:
    """SIGSTOP ``proc``'s tree while another target is measured: an idle canary-proxy with a
    watched directory of 1,000 files still polls it, on the same CPU as the target."""
    tree = proc.tree()
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def run_section(
    procs: Processes,
    section: Section,
    workdir: Path,
    backends: tuple[Backend, Backend],
    args: argparse.Namespace,
) -> list[Run]:
    for backend in backends:
        set_affinity(backend.proc, section.load_cpu)
    layout = layout_of(args)
    names = target_names(layout)
    tls = Tls.make(workdir) if args.https else None
    proxies = [
        start_nginx_proxy(procs, workdir, backends, workers=section.workers, cpu=section.proxy_cpu, tls=tls),
        start_canary_proxy(procs, workdir, backends, workers=section.workers, cpu=section.proxy_cpu, tls=tls),
    ]
    script = None
    if layout is not None:
        script = workdir / "routes.lua"
        script.write_text(layout.lua())
        proxies.append(
            start_canary_proxy(
                procs, workdir, backends, workers=section.workers, cpu=section.proxy_cpu, layout=layout
            )
        )
    targets = {"direct": Target("direct", f"http://127.0.0.1:{backends[0].port}")}
    targets.update((proxy.name, proxy) for proxy in proxies)

    def others_paused(name: str) -> contextlib.ExitStack:
        """Every canary-proxy but ``name`` stopped, so only the target measured takes CPU."""
        stack = contextlib.ExitStack()
        for other in proxies:
            if other.name != name and other.name.startswith("canary-proxy") and other.proc is not None:
                stack.enter_context(paused(other.proc))
        return stack

    runs: list[Run] = []
    try:
        bodies = args.bodies.split(",")
        if args.warmup > 0:
            for body in bodies:
                for name in names:
                    with others_paused(name):
                        run_wrk(
                            procs,
                            targets[name].url + BODIES[body][0],
                            connections=CONNECTIONS[0],
                            threads=section.wrk_threads,
                            duration=args.warmup,
                            cpu=section.load_cpu,
                            script=script,
                            close=body == "handshake",
                        )
        for repeat in range(args.repeats):
            turn = repeat % len(names)
            order = names[turn:] + names[:turn]  # take turns going first
            for body in bodies:
                for connections in CONNECTIONS:
                    for name in order:
                        with others_paused(name):
                            run = measure(
                                procs,
                                section,
                                targets[name],
                                backends,
                                body=body,
                                connections=connections,
                                repeat=repeat,
                                duration=args.duration,
                                script=script,
                            )
                        runs.append(run)
                        print(
                            f"  [{section.key} {repeat + 1}/{args.repeats}] {name:>19} {body:>5} "
                            f"@{connections:<2}: {run.rps:9.0f} req/s  p50 {ms(run.p50)}  p99 {ms(run.p99)}",
                            file=sys.stderr,
                        )
    finally:
        for target in proxies:
            if target.proc is not None:
                procs.stop(target.proc)
    return runs


# -- the report ------------------------------------------------------------------------------


def ms(seconds: float) -> str:
    value = seconds * 1000
    return f"{value:.2f} ms" if value < 10 else f"{value:.1f} ms" if value < 100 else f"{value:.0f} ms"


def us(seconds: float) -> str:
    value = seconds * 1e6
    return f"{value:.1f} µs" if value < 100 else f"{value:.0f} µs"


def median_of(runs: list[Run], attr: str) -> float | None:
    values = [getattr(r, attr) for r in runs if getattr(r, attr) is not None]
    return statistics.median(values) if values else None


def cell(
    value: float | None, reference: float | None, fmt: Callable[[float], str], is_reference: bool
) -> str:
    if value is None:
        return "-"
    if is_reference or not reference:
        return fmt(value)
    return f"{fmt(value)} ({value / reference:.2f}×)"  # noqa: RUF001  (a multiplication sign)


def section_table(
    section: Section, runs: list[Run], bodies: list[str], layout: RouteLayout | None
) -> list[str]:
    lines = [
        f"#### {section.title}",
        "",
        "| body | target | req/s @64 | p50 @64 | p99 @64 | p50 @1 | p99 @1 | proxy CPU / request |",
        "|---|---|--:|--:|--:|--:|--:|--:|",
    ]

    def pick(target: str, body: str, connections: int, attr: str) -> float | None:
        chosen = [
            r
            for r in runs
            if (r.target, r.body, r.connections, r.section) == (target, body, connections, section.key)
        ]
        return median_of(chosen, attr)

    names = target_names(layout)
    for body in bodies:
        for target in names:
            ref = target == "nginx"
            cols = [
                ("rps", 64, lambda v: f"{v:,.0f}"),
                ("p50", 64, ms),
                ("p99", 64, ms),
                ("p50", 1, ms),
                ("p99", 1, ms),
                ("cpu_per_request", 64, us),
            ]
            cells = [
                cell(pick(target, body, c, attr), pick("nginx", body, c, attr), fmt, ref)
                for attr, c, fmt in cols
            ]
            label = BODIES[body][1] if target == names[0] else ""
            lines.append(f"| {label} | {target_label(target, layout)} | " + " | ".join(cells) + " |")
    return lines


TIMES = "\u00d7"  # the multiplication sign of the ratios


def routes_lines(section: Section, runs: list[Run], bodies: list[str], layout: RouteLayout) -> list[str]:
    """The N-route canary-proxy against the one-route one, from the same run: the issue's
    target is req/s @64 within 10 %. A miss is reported, not an error: the run is valid."""
    lines = []
    measures: list[tuple[str, str, int, Callable[[float], str]]] = [
        ("req/s @64", "rps", 64, lambda v: f"{v:,.0f}"),
        ("p50 @1", "p50", 1, ms),
        ("CPU / request", "cpu_per_request", 64, us),
    ]
    for body in bodies:
        figures = []
        for what, attr, connections, fmt in measures:
            chosen = [
                r for r in runs if (r.section, r.body, r.connections) == (section.key, body, connections)
            ]
            many = median_of([r for r in chosen if r.target == ROUTES_TARGET], attr)
            one = median_of([r for r in chosen if r.target == "canary-proxy"], attr)
            if many is None or not one:
                continue
            figure = f"{what} {many / one:.3f}{TIMES} ({fmt(many)} against {fmt(one)})"
            if attr == "rps":
                floor = 1 - ROUTES_TARGET_MAX_LOSS
                good = many >= floor * one
                figure += " OK" if good else f" MISSED (target {floor:.2f}{TIMES} or more)"
            figures.append(figure)
        lines.append(f"- {BODIES[body][1]}: " + "; ".join(figures))
    head = f"{layout.routes:,} routes / {layout.hosts} hosts against 1 route (same run, same wrk script):"
    return [head, *lines]


def https_lines(section: Section, runs: list[Run]) -> list[str]:
    """--https: canary-proxy's keep-alive req/s and handshakes/s against nginx's, same run."""
    lines = ["HTTPS, canary-proxy against nginx (same certificate, same run), @64 connections:"]
    for body, what in (("small", "keep-alive req/s over TLS"), ("handshake", "new TLS handshakes/s")):
        chosen = [r for r in runs if (r.section, r.body, r.connections) == (section.key, body, 64)]
        ours = median_of([r for r in chosen if r.target == "canary-proxy"], "rps")
        theirs = median_of([r for r in chosen if r.target == "nginx"], "rps")
        if ours is None or not theirs:
            continue
        figure = f"- {what}: {ours / theirs:.2f}{TIMES} ({ours:,.0f} against {theirs:,.0f})"
        if body == "small":
            good = ours >= HTTPS_TARGET * theirs
            figure += " OK" if good else " MISSED"
            figure += f" (target {HTTPS_TARGET}{TIMES} or more)"
        lines.append(figure)
    return lines


def split_lines(section: Section, runs: list[Run], layout: RouteLayout | None) -> tuple[list[str], bool]:
    lines, ok = [], True
    p = CANARY_WEIGHT / 100
    for target in ("canary-proxy", ROUTES_TARGET, "nginx"):
        chosen = [r for r in runs if r.section == section.key and r.target == target]
        stable = sum(r.stable or 0 for r in chosen)
        canary = sum(r.canary or 0 for r in chosen)
        sent = sum(r.requests for r in chosen)
        n = stable + canary
        if not n:
            continue
        tolerance = bernstein_tolerance(p, n=n, sum_sq=n, max_cluster=1, delta=SPLIT_DELTA)
        share = canary / n
        good = abs(share - p) <= tolerance
        ok &= good
        lines.append(
            f"- {target_label(target, layout)}: {100 * share:.2f} % to the canary of {n:,} requests the "
            f"backends counted (wrk completed {sent:,}); configured {CANARY_WEIGHT} %, "
            f"tolerance ±{100 * tolerance:.2f} % (Bernstein, δ = {SPLIT_DELTA:g}): "
            f"{'OK' if good else 'OFF'}"
        )
    return lines, ok


def command_line() -> str:
    """How this script was started, with the interpreter relative to the current directory."""
    python = os.path.relpath(sys.executable) if sys.executable.startswith(os.getcwd()) else sys.executable
    return shlex.join([python, *sys.argv])


def version_of(argv: list[str], pattern: str) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "?"
    m = re.search(pattern, out.stdout + out.stderr)
    return m.group(1) if m else "?"


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def source_revision() -> str:
    """The commit measured, and whether the work tree differs from it."""
    git = ["git", "-C", str(ROOT)]
    head = version_of([*git, "rev-parse", "--short", "HEAD"], r"(\w+)")
    dirty = subprocess.run(
        [*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return f"canary-proxy {head}{' + uncommitted changes' if dirty else ''}"


def machine() -> str:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    nproc = version_of(["nproc"], r"(\d+)")
    loadavg = Path("/proc/loadavg").read_text().split()[:3]
    libs = ", ".join(f"{name} {v}" for name in ("httptools", "uvloop", "aiohttp") if (v := _version(name)))
    nginx = version_of(["nginx", "-v"], r"nginx/(\S+)")
    wrk = version_of(["wrk", "-v"], r"wrk (\S+)")
    return (
        f"{nproc} CPUs (`nproc`), {model}; Linux {platform.release()}; Python {platform.python_version()} "
        f"({libs}); nginx {nginx}; wrk {wrk}; {source_revision()}; load average at start {' '.join(loadavg)}"
    )


def report(
    args: argparse.Namespace, sections: list[Section], runs: list[Run], machine_line: str
) -> tuple[str, bool]:
    bodies = args.bodies.split(",")
    errors = sum(r.errors for r in runs)
    lines = [
        f"### canary-proxy vs nginx{' (SMOKE RUN: --quick, not for the README)' if args.quick else ''}",
        "",
        f"Machine: {machine_line}.",
        "",
        f"Command: `{command_line()}`",
        "",
        f"Each cell is the median of {args.repeats} wrk run{'s' * (args.repeats != 1)} "
        f"of {args.duration:g} s "
        "(`--latency`, keep-alive, GET). Ratios are to nginx in the same run. "
        f"Canary weight {CANARY_WEIGHT} %; canary-proxy "
        "with its access log (to a file) and metrics on; nginx with an access log too, "
        "`split_clients` on `$request_id`, upstream keep-alive, `proxy_buffering off` with "
        "`proxy_buffer_size 64k`. Backends: "
        "nginx with fixed bodies. CPU / request: the proxy's utime + stime over all its processes "
        "(the nginx master and worker; the canary-proxy supervisor and workers), at 64 connections.",
        "",
    ]
    if args.https:
        lines += [
            "HTTPS: both proxies terminate TLS with the same self-signed ECDSA P-256 certificate "
            "(canary-proxy `--tls-cert`/`--tls-key`, nginx `ssl_certificate`), each with its default "
            "session settings; the backends and `backend direct` are plain HTTP. `2 B, new TLS "
            "connection each`: wrk sends `Connection: close`, so each request is a new TCP "
            "connection and TLS handshake and its req/s are handshakes per second.",
            "",
        ]
    layout = layout_of(args)
    if layout is not None:
        lines += [
            f"{layout.label()}: every route points at the same backends; wrk sends every target the "
            f"same requests, round-robin over the {layout.routes:,} routes' Host and path (a Lua "
            "script); while one target is measured, the other canary-proxy is stopped (SIGSTOP).",
            "",
        ]
    ok = errors == 0
    for section in sections:
        chosen = [r for r in runs if r.section == section.key]
        if not chosen:
            continue
        lines += section_table(section, chosen, bodies, layout)
        if args.https:
            lines += ["", *https_lines(section, chosen)]
        if layout is not None:
            lines += ["", *routes_lines(section, chosen, bodies, layout)]
        split, good = split_lines(section, chosen, layout)
        ok &= good
        lines += ["", "Observed split (counted by each backend):", *split, ""]
    if errors:
        lines.append(f"**{errors} failed requests** (socket errors or non-2xx/3xx): see stderr.")
    return "\n".join(lines), ok


# -- main ------------------------------------------------------------------------------------


def sections_for(keys: list[str]) -> Iterator[Section]:
    nproc = len(os.sched_getaffinity(0))
    for key in keys:
        if key == "pinned":
            if nproc < 2:
                raise BenchError("the pinned section needs 2 CPUs (proxy on CPU 1, wrk + backends on CPU 0)")
            yield Section(
                "pinned",
                "One core each: canary-proxy `--workers 1` and nginx `worker_processes 1` on CPU 1; "
                "wrk (1 thread) and the backends on CPU 0",
                proxy_cpu="1",
                load_cpu="0",
                workers="1",
                wrk_threads=1,
            )
        elif key == "auto":
            yield Section(
                "auto",
                f"Unpinned: canary-proxy `--workers auto` and nginx `worker_processes auto` ({nproc} CPUs), "
                f"wrk ({nproc} threads) and the backends sharing the same CPUs",
                proxy_cpu=None,
                load_cpu=None,
                workers="auto",
                wrk_threads=nproc,
            )
        else:
            raise BenchError(f"unknown section {key!r}: expected pinned or auto")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run (default 10)")
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs per cell; the median is shown (default 3)"
    )
    parser.add_argument("--warmup", type=int, default=2, help="seconds of warm-up per target and body (2)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 s runs, 1 repeat, 1 s warm-up")
    parser.add_argument("--sections", default="pinned,auto", help="pinned,auto (default both)")
    parser.add_argument("--bodies", default="small,16k,1m", help="small,16k,1m (default all)")
    parser.add_argument("--json", type=Path, help="also write every run as JSON here")
    parser.add_argument(
        "--routes", type=int, default=0, help="also measure a canary-proxy serving N routes (default: off)"
    )
    parser.add_argument("--hosts", type=int, default=200, help="with --routes: over H hosts (default 200)")
    parser.add_argument(
        "--routes-from",
        choices=("dir", "file"),
        default="dir",
        help="with --routes: a --config-dir of N files (default), or one file of N documents",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory (configs, logs)")
    parser.add_argument(
        "--https",
        action="store_true",
        help="TLS on both proxies, the same certificate; bodies small and handshake unless --bodies",
    )
    args = parser.parse_args()
    if args.https and args.bodies == parser.get_default("bodies"):
        args.bodies = "small,handshake"
    if "handshake" in args.bodies.split(",") and not args.https:
        parser.error("the handshake body goes with --https")
    if args.https and args.routes:
        parser.error("--https and --routes are separate runs")
    if args.quick:
        args.duration, args.repeats, args.warmup = 2, 1, 1  # wrk takes whole seconds
    for body in args.bodies.split(","):
        if body not in BODIES:
            parser.error(f"unknown body {body!r}: expected small, 16k, 1m or handshake")
    if args.routes < 0 or (args.routes and not 1 <= args.hosts <= args.routes):
        parser.error("--routes N needs 1 <= --hosts <= N")
    for tool in ("nginx", "wrk", "taskset"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not installed (Debian packages nginx, wrk, util-linux)")
    # SIGTERM unwinds through the finally below like Ctrl-C, so every child is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    workdir = Path(tempfile.mkdtemp(prefix="canary-bench-"))
    procs = Processes()
    machine_line = machine()
    runs: list[Run] = []
    try:
        sections = list(sections_for(args.sections.split(",")))
        cells = (
            len(sections)
            * len(args.bodies.split(","))
            * len(CONNECTIONS)
            * len(target_names(layout_of(args)))
        )
        minutes = cells * (args.repeats * args.duration + args.warmup / len(CONNECTIONS)) / 60
        plan = f"{cells} cells x {args.repeats} runs of {args.duration}s"
        print(f"bench: {plan}: about {minutes:.0f} min", file=sys.stderr)
        backends = start_backends(procs, workdir, route_prefixes=bool(args.routes))
        for section in sections:
            print(f"== {section.key}", file=sys.stderr)
            runs += run_section(procs, section, workdir, backends, args)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted; every process it started is stopped", file=sys.stderr)
        return 130
    finally:
        procs.stop_all()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in runs], indent=1))
    text, ok = report(args, sections, runs, machine_line)
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
