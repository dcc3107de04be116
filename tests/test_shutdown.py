"""Graceful shutdown on SIGTERM: not ready at once, drain, finish in-flight work, exit 0."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import fcntl
import os
import signal
import socket
import struct
import sys
import termios
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
import yaml

from .conftest import Backend, ProxyFactory, ProxyProcess, base_config, port_of, stop_proxy
from .scrape import eventually

TERM_LOGGED = "SIGTERM: /readyz is now 503"


async def readyz(proxy: ProxyProcess) -> int:
    async with aiohttp.ClientSession() as session, session.get(proxy.admin_url + "/readyz") as r:
        return r.status


async def exit_code(proxy: ProxyProcess, timeout: float = 10) -> int:
    """Wait for the exit that one SIGTERM started (more of them change nothing: see
    ``test_more_sigterms_during_teardown_still_exit_0``)."""
    return await asyncio.wait_for(proxy.process.wait(), timeout)


async def sigterm(proxy: ProxyProcess) -> None:
    """Send SIGTERM and wait for the proxy to say it is no longer ready."""
    mark = len(proxy.logs)
    proxy.process.send_signal(signal.SIGTERM)
    await proxy.wait_log(lambda e: str(e.get("msg")).startswith(TERM_LOGGED), since=mark)


async def test_readyz_turns_503_at_once_while_the_proxy_still_serves(
    backends: tuple[Backend, Backend], proxy_factory: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    stable, canary = backends
    proxy = await proxy_factory(base_config(stable, canary), "--drain-delay", "1s")
    assert await readyz(proxy) == 200
    started = time.monotonic()
    await sigterm(proxy)
    assert await readyz(proxy) == 503
    # Still serving during the drain delay, telling keep-alive clients to go elsewhere.
    async with client.get(proxy.url + "/") as r:
        assert r.status == 200
        assert r.headers["Connection"] == "close"
        assert (await r.json())["version"] == "stable"
    assert await exit_code(proxy) == 0
    assert time.monotonic() - started >= 1.0  # it did wait out the drain delay


async def test_a_slow_request_in_flight_completes_during_shutdown(
    backends: tuple[Backend, Backend], proxy_factory: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    stable, canary = backends
    proxy = await proxy_factory(base_config(stable, canary), "--shutdown-timeout", "5s")
    stable.delay = 1.0
    request = asyncio.create_task(client.get(proxy.url + "/slow"))
    await eventually(lambda: stable.hits == 1, what="the request reached stable")
    await sigterm(proxy)
    async with await request as r:
        assert r.status == 200
        assert (await r.json())["path"] == "/slow"
    assert await exit_code(proxy) == 0
    entry = proxy.access[-1]
    assert entry["path"] == "/slow" and entry["status"] == 200


async def test_requests_on_connections_accepted_before_the_listener_closed_are_served(
    backends: tuple[Backend, Backend], proxy_factory: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    stable, canary = backends
    proxy = await proxy_factory(base_config(stable, canary), "--shutdown-timeout", "5s")
    port = port_of(proxy.url)
    # One connection that has sent nothing yet, one in the middle of its request head.
    fresh = await asyncio.open_connection("127.0.0.1", port)
    partial = await asyncio.open_connection("127.0.0.1", port)
    partial[1].write(b"GET /partial HTTP/1.1\r\nHost: x\r\n")
    await partial[1].drain()
    # A full exchange on a third connection: the proxy's loop has accepted and read the two
    # earlier ones by the time it answers this one.
    async with client.get(proxy.url + "/sync") as r:
        assert r.status == 200
    await sigterm(proxy)  # the drain delay is 0: the listener closes now
    partial[1].write(b"X-Late: 1\r\n\r\n")
    fresh[1].write(b"GET /fresh HTTP/1.1\r\nHost: x\r\n\r\n")
    for reader, writer in (partial, fresh):
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200 "), head
        assert b"\r\nconnection: close\r\n" in head.lower(), head  # and then it goes away
        writer.close()
    assert await exit_code(proxy) == 0


async def test_websockets_get_1001_and_cannot_hold_shutdown(
    backends: tuple[Backend, Backend], proxy_factory: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    stable, canary = backends
    proxy = await proxy_factory(base_config(stable, canary), "--shutdown-timeout", "1s")
    polite = await client.ws_connect(proxy.url + "/ws")
    await polite.send_str("hi")
    assert await polite.receive_str() == "stable:hi"
    # A client that neither reads nor answers the close handshake, with megabytes of echo
    # from the backend queued towards it: closing it can never complete on its own.
    deaf = await raw_websocket(port_of(proxy.url))
    for _ in range(4):
        deaf.write(masked_text_frame(3_000_000))
    await asyncio.wait_for(deaf.drain(), 10)
    # The echo is arriving: more than all the buffers on its way can hold.
    await eventually(lambda: unread(deaf) > 0, what="the echo reached the deaf client")
    started = time.monotonic()
    await sigterm(proxy)
    closing = await asyncio.wait_for(polite.receive(), 5)
    assert closing.type == aiohttp.WSMsgType.CLOSE, closing
    assert closing.data == aiohttp.WSCloseCode.GOING_AWAY
    assert await exit_code(proxy) == 0
    # 1 s of shutdown-timeout, plus the exit and slack for a busy machine: nowhere near the
    # WebSocket close handshake's own 10 s timeout, nor forever (a write that never drains).
    assert time.monotonic() - started < 4.0
    await polite.close()
    deaf.close()


def unread(writer: asyncio.StreamWriter) -> int:
    """Bytes waiting in the socket's kernel receive queue."""
    sock = writer.get_extra_info("socket")
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4))[0]


def masked_text_frame(size: int) -> bytes:
    """One client-to-server text frame (masked with a zero key, so the payload is as is)."""
    return b"\x81\xff" + size.to_bytes(8, "big") + b"\0\0\0\0" + b"z" * size


async def raw_websocket(port: int) -> asyncio.StreamWriter:
    """A WebSocket handshake by hand on a socket with a tiny receive buffer."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (
            "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 101"), head
    return writer


# -- no accepted request is lost ---------------------------------------------------------------


@dataclass
class Load:
    """Steady load: each loop sends GETs, every one on a new connection, until refused."""

    url: str
    ok: int = 0
    ok_after_term: int = 0
    refused: int = 0
    reset_in_handshake: int = 0
    lost: list[str] = field(default_factory=list)
    termed: bool = False
    warmed_up: asyncio.Event = field(default_factory=asyncio.Event)

    async def loop(self, session: aiohttp.ClientSession, deadline: float) -> None:
        while time.monotonic() < deadline:
            try:
                async with session.get(self.url + "/") as r:
                    body = await r.json()
                    if r.status != 200 or body.get("version") != "stable":
                        self.lost.append(f"{r.status} {body}")
                        continue
            except aiohttp.ClientConnectorError as exc:
                # The connect call itself failed, so not one byte of the request left the
                # client: the proxy never accepted it. Refused: the listener is closed. Reset:
                # the kernel reset a connection the proxy had not accept()ed yet when its
                # listener closed (in about 1 run of 15 with two workers).
                code = exc.os_error.errno
                if self.termed and code == errno.ECONNREFUSED:
                    self.refused += 1
                    return
                if self.termed and code == errno.ECONNRESET:
                    self.reset_in_handshake += 1
                    continue
                self.lost.append(repr(exc))
                continue
            except (aiohttp.ClientError, TimeoutError) as exc:
                self.lost.append(repr(exc))
                continue
            self.ok += 1
            self.ok_after_term += self.termed
            if self.ok >= 40:
                self.warmed_up.set()


async def run_load_through_shutdown(proxy: ProxyProcess, *, clients: int = 8) -> Load:
    load = Load(proxy.url)
    connector = aiohttp.TCPConnector(force_close=True, limit=0)
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(
        connector=connector, cookie_jar=aiohttp.DummyCookieJar(), timeout=timeout
    ) as session:
        deadline = time.monotonic() + 20  # bound: the loops stop by themselves
        loops = [asyncio.create_task(load.loop(session, deadline)) for _ in range(clients)]
        await asyncio.wait_for(load.warmed_up.wait(), 10)
        load.termed = True
        await sigterm(proxy)
        await asyncio.wait_for(asyncio.gather(*loops), 25)
    assert await exit_code(proxy) == 0
    await stop_proxy(proxy)  # read stdout to its end
    return load


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_a_restart_under_steady_load_loses_no_accepted_request(
    backends: tuple[Backend, Backend], proxy_factory: ProxyFactory, workers: str
) -> None:
    stable, canary = backends
    stable.delay = 0.02  # so that requests are in flight when the listener closes
    proxy = await proxy_factory(
        base_config(stable, canary),
        "--workers",
        workers,
        "--drain-delay",
        "500ms",
        "--shutdown-timeout",
        "5s",
    )
    load = await run_load_through_shutdown(proxy)
    assert load.lost == [], load.lost
    assert load.ok_after_term > 0, "the load did not go on through the drain delay"
    assert load.refused == 8, "every loop ended on a refused connect"
    # Every request the clients saw answered was logged, one whole JSON line each (two workers
    # share stdout: their lines must never interleave).
    assert len(proxy.access) == load.ok
    assert all("raw" not in line for line in proxy.access)


# -- signals during teardown --------------------------------------------------------------------


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_more_sigterms_during_teardown_still_exit_0(
    backends: tuple[Backend, Backend], proxy_factory: ProxyFactory, workers: str
) -> None:
    """Kubernetes, a supervisor or an impatient person may repeat SIGTERM: once stopping,
    it changes nothing, up to the very last instant of the exit."""
    stable, canary = backends
    proxy = await proxy_factory(base_config(stable, canary), "--workers", workers, "--drain-delay", "300ms")
    await sigterm(proxy)
    while proxy.process.returncode is None:  # until it is gone, through every stage of teardown
        # os.kill, not Process.send_signal: that one polls (waitpid) first and may reap the
        # child under asyncio's child watcher, which then reports a made-up returncode 255.
        with contextlib.suppress(ProcessLookupError):
            os.kill(proxy.pid, signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(proxy.process.wait()), 0.002)
    assert await exit_code(proxy) == 0


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_sigint_is_named_and_a_second_one_skips_the_drain(
    backends: tuple[Backend, Backend], proxy_factory: ProxyFactory, workers: str
) -> None:
    stable, canary = backends
    proxy = await proxy_factory(base_config(stable, canary), "--workers", workers, "--drain-delay", "30s")
    mark = len(proxy.logs)
    proxy.process.send_signal(signal.SIGINT)
    await proxy.wait_log(lambda e: str(e.get("msg")).startswith("SIGINT: /readyz is now 503"), since=mark)
    assert await readyz(proxy) == 503
    started = time.monotonic()
    proxy.process.send_signal(signal.SIGINT)  # Ctrl-C again: do not wait out the 30 s
    assert await exit_code(proxy, timeout=10) == 130  # interrupted: the drain was cut short
    assert time.monotonic() - started < 5
    assert any("second SIGINT" in str(e.get("msg")) for e in proxy.logs[mark:])


async def test_ctrl_c_in_a_terminal_reaches_every_worker_and_twice_stops_them_all(
    backends: tuple[Backend, Backend], tmp_path: Path
) -> None:
    """A terminal sends Ctrl-C to the whole foreground process group: the supervisor and
    each worker get SIGINT at once, then the supervisor's SIGTERM. One Ctrl-C must still
    drain (not count twice); a second one stops everything now."""
    stable, canary = backends
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(base_config(stable, canary)))
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "canary_proxy", "serve", "--config", str(config), "--workers", "2",
        "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--drain-delay", "30s",
        stderr=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
        start_new_session=True,  # its own process group, as a shell gives a foreground job
    )  # fmt: skip
    assert process.stderr is not None
    try:
        while b'"msg": "ready"' not in await asyncio.wait_for(process.stderr.readline(), 20):
            pass
        os.killpg(process.pid, signal.SIGINT)
        with pytest.raises(TimeoutError):  # draining: 30 s of drain delay
            await asyncio.wait_for(asyncio.shield(process.wait()), 1.5)
        os.killpg(process.pid, signal.SIGINT)
        assert await asyncio.wait_for(process.wait(), 10) == 130
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()
        await process.stderr.read()
