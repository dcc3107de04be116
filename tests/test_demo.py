"""The README's first command: ``canary-proxy demo`` runs a whole rollout with nothing else running.

Run as users run it, as a process; its stdout is a pipe here, so it prints plain progress
lines (the live view is for terminals). ``--speed`` keeps each run well under a minute.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys
import time

import aiohttp
import pytest

SPEED = "2.5"  # about 25 s for a promotion, 12 s for a rollback
ANSI = re.compile(r"\x1b\[")


async def run_demo(*args: str, timeout: float = 75, speed: str = SPEED) -> tuple[int, list[str], str, float]:
    """(exit code, stdout lines, stderr, seconds)."""
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "canary_proxy", "demo", "--speed", speed, *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env={**os.environ, "TERM": "xterm"},
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        out, err = await process.communicate()
        raise AssertionError(
            f"demo still running after {timeout}s:\n{out.decode()}\n{err.decode()}"
        ) from None
    assert process.returncode is not None
    return process.returncode, out.decode().splitlines(), err.decode(), time.monotonic() - started


def events(lines: list[str]) -> list[str]:
    """The timestamped progress lines, without their ``[ 12.3s]`` prefix."""
    return [line.split("] ", 1)[1] for line in lines if re.match(r"^\[\s*\d+\.\d+s\] ", line)]


def intro(lines: list[str]) -> dict[str, str]:
    pairs = [line.split() for line in lines if line.startswith("  ") and "http://127.0.0.1:" in line]
    return {" ".join(p[:-1]): p[-1] for p in pairs if len(p) >= 2}


@pytest.mark.timeout(90)
async def test_a_healthy_canary_is_promoted() -> None:
    code, lines, err, took = await run_demo()
    assert code == 0, (lines, err)
    assert took < 60, took
    assert lines[0] == "canary-proxy demo: a rollout through 5,10,25,50,100 on loopback; healthy canary"
    urls = intro(lines)
    assert urls.keys() >= {"stable v1", "canary v2", "proxy", "metrics", "dashboard"}
    assert urls["dashboard"].endswith("/") and urls["metrics"] == urls["dashboard"] + "metrics"
    steps = [e for e in events(lines) if e.startswith(("rollout started", "step done", "promoted"))]
    assert steps == [
        "rollout started: steps 5,10,25,50,100; step 1/5 (5%)",
        "step done; now at step 2/5 (10%)",
        "step done; now at step 3/5 (25%)",
        "step done; now at step 4/5 (50%)",
        "step done; now at step 5/5 (100%)",
        "promoted: step done at step 5/5 (100%); the canary serves 100%",
    ]
    checks = [e for e in events(lines) if e.startswith("check ")]
    assert any(c.startswith("check pass at step 5/5 (100%): canary ") for c in checks), checks
    traffic = [e for e in events(lines) if e.startswith("traffic: weight ")]
    assert (
        traffic
        and "stable v1 " in traffic[-1]
        and "canary v2 " in traffic[-1]
        and "sticky users" in traffic[-1]
    )
    assert lines[-1] == "result: promoted (exit 0)"
    assert not ANSI.search("\n".join(lines)), "plain lines only when stdout is not a terminal"


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    ("mode", "failing"),
    [("errors", "> max 1.00% FAIL"), ("latency", "> max 500.0ms FAIL")],
)
async def test_a_bad_canary_is_caught_and_rolled_back(mode: str, failing: str) -> None:
    code, lines, err, took = await run_demo("--bad-canary", mode)
    assert code == 1, (lines, err)
    assert took < 60, took
    assert lines[0].endswith(f"bad canary: v2 starts failing ({mode}) once it serves 20% of traffic")
    happened = events(lines)
    starts = [e for e in happened if e.startswith("canary v2 starts failing now")]
    assert starts == [
        f"canary v2 starts failing now (--bad-canary {mode}): the proxy serves it 25% >= --fail-at 20%"
    ]
    failed = [e for e in happened if e.startswith("check fail at step 3/5 (25%)")]
    assert len(failed) >= 2 and failing in failed[-1], happened
    rolled = [e for e in happened if e.startswith("rolled back")]
    assert len(rolled) == 1 and "2 consecutive failed checks" in rolled[0] and "step 3/5 (25%)" in rolled[0]
    assert not any("now at step 4/5" in e for e in happened)
    assert lines[-1] == "result: rolled back (exit 1)"


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("bad", "outcomes", "code"),
    [([], ("promoted", "promoted"), 0), (["--bad-canary", "errors"], ("rolled back", "promoted"), 1)],
    ids=["healthy", "bad-shop"],
)
async def test_two_services_behind_one_proxy_each_roll_out_on_their_own(
    bad: list[str], outcomes: tuple[str, str], code: int
) -> None:
    """``--services 2``: shop and blog by Host, each its own rollout on its own route's
    series; a bad canary is shop's only, so shop rolls back while blog is promoted."""
    exit_code, lines, err, took = await run_demo("--services", "2", *bad, speed="10", timeout=45)
    assert exit_code == code, (lines, err)
    assert took < 30, took
    assert lines[0] == (
        "canary-proxy demo: 2 services behind one proxy, each a rollout through 5,10,25,50,100 on loopback"
    )
    urls = intro(lines)
    assert urls.keys() >= {"shop stable v1", "shop canary v2", "blog stable v1", "blog canary v2", "proxy"}
    finished = {
        e.split(":")[0]: e for e in events(lines) if re.match(r"(shop|blog): (promoted|rolled back)", e)
    }
    for name, outcome in zip(("shop", "blog"), outcomes, strict=True):
        assert finished[name].startswith(f"{name}: {outcome}"), finished
    failing = [e for e in events(lines) if "canary v2 starts failing now" in e]
    assert len(failing) == len(bad[:1]) and all(e.startswith("shop: ") for e in failing)
    # Both routes served both versions: the proxy's own totals, per route, as the run ends.
    for line, (name, outcome) in zip(lines[-3:-1], zip(("shop", "blog"), outcomes, strict=True), strict=True):
        served = re.fullmatch(
            rf"{name}: {outcome}; served (\d+) requests \((\d+) by stable v1, (\d+) by canary v2\)", line
        )
        assert served is not None and int(served[2]) > 0 and int(served[3]) > 0, lines[-3:]
    assert lines[-1] == f"result: {'promoted' if code == 0 else 'rolled back'} (exit {code})"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.timeout(60)
async def test_ctrl_c_stops_every_process_and_exits_130() -> None:
    port, admin_port = free_port(), free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "canary_proxy", "demo", "--speed", SPEED,
        "--port", str(port), "--admin-port", str(admin_port),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None
    lines: list[str] = []
    try:
        async with asyncio.timeout(30):
            while not any("check pass" in line for line in lines):
                line = await process.stdout.readline()
                assert line, f"demo exited early: {lines}"
                lines.append(line.decode().rstrip("\n"))
        process.send_signal(signal.SIGINT)
        out, _ = await asyncio.wait_for(process.communicate(), 20)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 130
    assert out.decode().splitlines()[-1] == "stopped: every process is shut down"
    urls = intro(lines)
    assert (
        urls["proxy"] == f"http://127.0.0.1:{port}" and urls["dashboard"] == f"http://127.0.0.1:{admin_port}/"
    )
    async with aiohttp.ClientSession() as session:
        for name in ("proxy", "dashboard", "stable v1", "canary v2"):
            with pytest.raises(aiohttp.ClientConnectionError):
                async with session.get(urls[name]):
                    pass


async def test_a_port_in_use_is_a_plain_error_and_exit_2() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, lines, err, _ = await run_demo("--admin-port", str(port), timeout=20)
    assert code == 2 and lines == []
    assert err == f"error: --admin-port {port}: 127.0.0.1:{port} is not free (Address already in use)\n"
