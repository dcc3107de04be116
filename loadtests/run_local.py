"""Run the Locust load test against a real proxy on loopback, with a weight change mid-run.

Starts two demo backends and ``canary-proxy serve`` on free loopback ports, runs Locust
headless for ``--duration`` seconds, and moves the weight through ``--weights`` in equal
steps by rewriting the config file atomically (temp + rename), as an operator or a rollout
would. The locustfile follows ``/config`` and judges the share per weight and every flip
against the weight history; this script then checks that each weight got its own judged
share (the share followed the change) and reads Locust's exact totals from ``--json-file``.
Exits 0 only if every check passed. Every process it starts is stopped by its pid.

    .venv/bin/python loadtests/run_local.py --duration 60 [--users 30] [--weights 10,30]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
STOP_GRACE = 10.0  # seconds between SIGTERM and SIGKILL


class RunError(Exception):
    pass


class Processes:
    """Every process started, stopped in reverse order by pid (SIGTERM, then SIGKILL)."""

    def __init__(self) -> None:
        self.started: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(argv, **kwargs)
        self.started.append((name, process))
        return process

    def stop_all(self) -> None:
        for _name, process in reversed(self.started):
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGTERM)
        for _name, process in reversed(self.started):
            try:
                process.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGKILL)
                process.wait(STOP_GRACE)


def wait_for(predicate: Any, *, timeout: float, what: str, process: subprocess.Popen[bytes]) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result is not None:
            return result
        if process.poll() is not None:
            raise RunError(f"{what}: the process exited with {process.returncode}")
        time.sleep(0.05)
    raise RunError(f"{what}: not within {timeout:.0f}s")


def first_json_line(path: Path, match: Any) -> dict[str, Any] | None:
    with contextlib.suppress(FileNotFoundError):
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict) and match(entry):
                    return entry
    return None


def write_config(path: Path, config: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(config))
    os.replace(tmp, path)


def admin_config(admin: str) -> dict[str, Any]:
    with urllib.request.urlopen(admin + "/config", timeout=5) as response:
        data: dict[str, Any] = json.load(response)
        return data


def set_weight(path: Path, config: dict[str, Any], weight: float, admin: str) -> float:
    """Rewrite the config with a new weight; return seconds until /config shows it."""
    config["canary-weight"] = weight
    started = time.monotonic()
    write_config(path, config)
    deadline = started + 10
    while time.monotonic() < deadline:
        if float(admin_config(admin)["canary-weight"]) == weight:
            return time.monotonic() - started
        time.sleep(0.05)
    raise RunError(f"the proxy did not apply canary-weight {weight} within 10s")


def locust_totals(path: Path) -> tuple[int, int]:
    entries = json.loads(path.read_text())
    return sum(e["num_requests"] for e in entries), sum(e["num_failures"] for e in entries)


def run(args: argparse.Namespace, procs: Processes, workdir: Path) -> list[str]:
    """Run everything; return the failed checks (empty: all passed)."""
    weights = [float(w) for w in args.weights.split(",")]
    backend_out = workdir / "backends.out"
    with backend_out.open("wb") as out:
        backends = procs.start("backends", [sys.executable, str(HERE / "backends.py")], stdout=out)
    ports = wait_for(
        lambda: first_json_line(backend_out, lambda e: "stable" in e),
        timeout=30,
        what="backends",
        process=backends,
    )
    config_path = workdir / "canary.yaml"
    config: dict[str, Any] = {
        "stable-url": f"http://127.0.0.1:{ports['stable']}",
        "canary-url": f"http://127.0.0.1:{ports['canary']}",
        "canary-weight": weights[0],
        "canary-by-header": "X-Canary",
        "canary-by-header-value": "qa",  # the locustfile must read it from /config
    }
    write_config(config_path, config)
    proxy_log = workdir / "proxy.log"
    with (workdir / "access.log").open("wb") as access, proxy_log.open("wb") as log:
        proxy = procs.start(
            "proxy",
            [
                sys.executable, "-m", "canary_proxy", "serve", "--config", str(config_path),
                "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
                "--drain-delay", "0", "--workers", args.workers,
            ],
            stdout=access,  # the access log stays on, as in production
            stderr=log,
        )  # fmt: skip
    ready = wait_for(
        lambda: first_json_line(proxy_log, lambda e: e.get("msg") == "ready"),
        timeout=30,
        what="proxy ready",
        process=proxy,
    )
    url, admin = "http://" + ready["public"], "http://" + ready["admin"]
    print(f"backends :{ports['stable']} (stable) :{ports['canary']} (canary); proxy {url}, admin {admin}")

    report_path, stats_prefix = workdir / "report.json", workdir / "locust-stats"
    env = {
        **os.environ,
        "CANARY_PROXY_ADMIN_URL": admin,
        "CANARY_REPORT_FILE": str(report_path),
        "CANARY_MAX_ERROR_RATE": str(args.max_error_rate),
        "CANARY_MAX_REQUESTS": str(args.duration * 20_000),  # a count bound besides --run-time
    }
    locust_out = workdir / "locust.out"
    with locust_out.open("wb") as out, (workdir / "locust.log").open("wb") as err:
        locust = procs.start(
            "locust",
            [
                sys.executable, "-m", "locust", "-f", str(HERE / "locustfile.py"),
                "--headless", "-u", str(args.users), "-r", str(args.users),
                "--run-time", f"{args.duration}s", "--host", url,
                "--json-file", str(stats_prefix), "--loglevel", "WARNING",
            ],
            stdout=out,
            stderr=err,
            env=env,
        )  # fmt: skip
    started = time.monotonic()
    for step, weight in enumerate(weights[1:], start=1):
        at = started + args.duration * step / len(weights)
        while time.monotonic() < at and locust.poll() is None:
            time.sleep(0.05)
        if locust.poll() is not None:
            break
        took = set_weight(config_path, config, weight, admin)
        elapsed = time.monotonic() - started
        print(f"t={elapsed:5.1f}s  canary-weight -> {weight:g} (in effect after {took:.2f}s)")
    try:
        code = locust.wait(args.duration + 60)
    except subprocess.TimeoutExpired:
        raise RunError("locust did not stop within its run time + 60s") from None

    text = locust_out.read_text()
    start = text.find("canary load test report")
    print(text[start:].rstrip() if start >= 0 else text.rstrip())
    failed: list[str] = []
    if code != 0:
        failed.append(f"locust exited with {code}")
    stats_file = stats_prefix.with_name(stats_prefix.name + ".json")
    if not report_path.exists() or not stats_file.exists():
        err_tail = (workdir / "locust.log").read_text()[-3000:]
        return [*failed, f"locust wrote no report; its log ends:\n{err_tail}"]
    report = json.loads(report_path.read_text())
    requests, failures = locust_totals(stats_file)
    print(f"locust totals (--json-file): {requests} requests, {failures} failures")
    if (requests, failures) != (report["requests"], report["failures"]):
        failed.append(f"--json-file totals {requests}/{failures} differ from the report's")
    judged = {p["weight"] for p in report["phases"] if p["judged"]}
    for weight in weights:
        if weight not in judged:
            failed.append(f"no judged share at canary-weight {weight:g}: the share did not follow it")
    if any(b > a for a, b in itertools.pairwise(weights)):
        print(
            f"sticky users moved stable->canary after the rise: "
            f"{report['flips']['allowed_stable_to_canary']} (allowed); "
            f"canary->stable: {report['flips']['violations']} violations"
        )
    failed += [f"{c['name']}: {c['detail']}" for c in report["checks"] if not c["pass"]]
    return failed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=60, help="seconds of load (default 60)")
    parser.add_argument("--users", type=int, default=30, help="Locust users (default 30)")
    parser.add_argument("--weights", default="10,30", help="canary weights, in equal steps (default 10,30)")
    parser.add_argument("--workers", default="1", help="the proxy's --workers (default 1)")
    parser.add_argument(
        "--max-error-rate",
        type=float,
        default=0.0,
        help="on loopback no request may fail, reloads included (default 0)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, reports)")
    args = parser.parse_args()
    # SIGTERM (a CI timeout) unwinds through the finally below, which stops the children.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    workdir = Path(tempfile.mkdtemp(prefix="canary-loadtest-"))
    procs = Processes()
    try:
        failed = run(args, procs, workdir)
    except RunError as exc:
        failed = [str(exc)]
    except KeyboardInterrupt:
        failed = ["interrupted"]
    finally:
        procs.stop_all()
    for line in failed:
        print(f"FAILED: {line}")
    print(f"run-local: {'FAIL' if failed else 'PASS'} (work directory {workdir})")
    if not args.keep and not failed:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
