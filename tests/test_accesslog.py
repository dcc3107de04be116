"""The JSON access log on stdout, X-Request-Id both ways, and the JSON app log on stderr."""

from __future__ import annotations

import asyncio
import json
import os
import re
import select
from datetime import datetime
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest

from canary_proxy.proxy import accesslog
from canary_proxy.proxy.accesslog import AccessLog

from .conftest import (
    Backend,
    ProxyFactory,
    ProxyProcess,
    base_config,
    port_of,
    raw_request,
    stop_proxy,
)
from .scrape import eventually

FIELDS = {
    "time",
    "method",
    "path",
    "status",
    "route",
    "version",
    "rule",
    "upstream_seconds",
    "duration_seconds",
    "bytes_in",
    "bytes_out",
    "client",
    "request_id",
}
GENERATED_ID = re.compile(r"^[0-9a-f]{32}$")


async def access_lines(proxy: ProxyProcess, n: int) -> list[dict[str, Any]]:
    """Wait until ``n`` access lines arrived (stdout has no log event to await; polled)."""
    await eventually(lambda: len(proxy.access) >= n, what=f"{n} access log lines")
    return proxy.access


def sent_header(backend: Backend, name: str) -> list[str]:
    return [v for k, v in backend.requests[-1]["headers"] if k.lower() == name.lower()]


async def test_one_line_per_request_with_exactly_the_contract_keys(
    backends: tuple[Backend, Backend], proxy_factory: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    stable, canary = backends
    proxy = await proxy_factory(base_config(stable, canary, canary_by_header="X-Canary"))
    async with client.post(
        proxy.url + "/submit?x=1", data=b"hello", headers={"X-Request-Id": "abc-123"}
    ) as r:
        body = await r.read()
        assert r.status == 200
        assert r.headers["X-Request-Id"] == "abc-123"
    assert sent_header(stable, "X-Request-Id") == ["abc-123"]
    async with client.get(proxy.url + "/c", headers={"X-Canary": "always"}) as r:
        await r.read()

    first, second = await access_lines(proxy, 2)
    assert set(first) == FIELDS and set(second) == FIELDS
    stamp = datetime.fromisoformat(first["time"])  # RFC 3339, in UTC
    assert stamp.utcoffset() is not None and stamp.utcoffset().total_seconds() == 0
    assert first["method"] == "POST"
    assert first["path"] == "/submit?x=1"
    assert first["status"] == 200
    assert (first["version"], first["rule"]) == ("stable", "weight")
    assert first["bytes_in"] == 5
    assert first["bytes_out"] == len(body)
    assert first["client"] == "127.0.0.1"
    assert first["request_id"] == "abc-123"
    assert 0 <= first["upstream_seconds"] <= first["duration_seconds"] < 5
    assert (second["method"], second["path"]) == ("GET", "/c")
    assert (second["version"], second["rule"]) == ("canary", "header")
    assert second["bytes_in"] == 0


async def test_a_request_id_is_generated_when_absent_or_unusable(
    backends: tuple[Backend, Backend], proxy_factory: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    stable, canary = backends
    proxy = await proxy_factory(base_config(stable, canary))
    ids = []
    for headers in ({}, {}, {"X-Request-Id": "x" * 500}):
        async with client.get(proxy.url + "/", headers=headers) as r:
            await r.read()
            rid = r.headers["X-Request-Id"]
        assert GENERATED_ID.match(rid), rid
        assert sent_header(stable, "X-Request-Id") == [rid]
        ids.append(rid)
    assert len(set(ids)) == 3
    lines = await access_lines(proxy, 3)
    assert [line["request_id"] for line in lines] == ids


async def test_an_error_the_proxy_answers_itself_is_logged(
    backends: tuple[Backend, Backend], proxy_factory: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    stable, canary = backends
    proxy = await proxy_factory(
        {**base_config(stable, canary), "stable-url": "http://127.0.0.1:1"}  # refused
    )
    async with client.get(proxy.url + "/x", headers={"X-Request-Id": "e1"}) as r:
        assert r.status == 502
        assert r.headers["X-Request-Id"] == "e1"
    (line,) = await access_lines(proxy, 1)
    assert (line["status"], line["version"], line["request_id"]) == (502, "stable", "e1")
    assert line["upstream_seconds"] is None  # no upstream answer to time


async def test_paths_are_escaped_one_line_per_request(
    backends: tuple[Backend, Backend], proxy_factory: ProxyFactory
) -> None:
    stable, canary = backends
    proxy = await proxy_factory(base_config(stable, canary))
    port = port_of(proxy.url)
    paths = [
        "/a%0Ab%0D%0A{}",
        '/q"uote\\back?x=%0a"}',
        "/%00%1b[31mred",
        "/" + "p" * 5000,
    ]
    statuses = []
    for path in paths:
        answer = await raw_request(
            port, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
        )
        assert b"\r\nX-Canary-Version: stable\r\n" in answer, answer[:300]  # proxied
        statuses.append(int(answer.split(b" ", 2)[1]))
    # Raw control bytes never reach the proxy: the HTTP parser answers 400 by itself.
    answer = await raw_request(port, b"GET /a\x1b\nb HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.") and b" 400 " in answer.split(b"\r\n")[0]
    # A client's request id may hold quotes and backslashes too. This last line also proves
    # every earlier one has been written.
    answer = await raw_request(
        port, b'GET /last HTTP/1.1\r\nHost: x\r\nX-Request-Id: q"u\\o\r\nConnection: close\r\n\r\n'
    )
    assert b'\r\nx-request-id: q"u\\o\r\n' in answer.lower(), answer[:300]
    lines = await access_lines(proxy, len(paths) + 2)
    assert lines[-1]["request_id"] == 'q"u\\o'
    assert all("raw" not in line for line in lines), lines
    assert [line["status"] for line in lines[:4]] == statuses
    # The parser's 400 is logged too, as unrouted: bad input is visible.
    assert (lines[4]["status"], lines[4]["version"], lines[4]["rule"]) == (400, "none", "rejected")
    logged = [line["path"] for line in lines]
    assert logged[:3] == paths[:3]
    assert logged[3] == paths[3][:2048] + "..."  # a huge path is cut, the line stays small
    assert logged[5:] == ["/last"]


async def test_access_log_off_writes_nothing_on_stdout(
    backends: tuple[Backend, Backend], proxy_factory: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    stable, canary = backends
    proxy = await proxy_factory(base_config(stable, canary), "--access-log", "off")
    for _ in range(3):
        async with client.get(proxy.url + "/") as r:
            assert r.status == 200
    await stop_proxy(proxy)  # stdout is read to its end
    assert proxy.access == []


async def test_admin_requests_are_not_access_logged(
    backends: tuple[Backend, Backend], proxy_factory: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    stable, canary = backends
    proxy = await proxy_factory(base_config(stable, canary))
    for path in ("/metrics", "/healthz", "/readyz", "/config", "/nope"):
        async with client.get(proxy.admin_url + path) as r:
            await r.read()
    async with client.get(proxy.url + "/proxied") as r:
        await r.read()
    await access_lines(proxy, 1)
    await stop_proxy(proxy)
    assert [line["path"] for line in proxy.access] == ["/proxied"]


async def test_app_logs_are_json_on_stderr_or_text_on_request(
    backends: tuple[Backend, Backend], proxy_factory: ProxyFactory
) -> None:
    stable, canary = backends
    proxy = await proxy_factory(base_config(stable, canary))
    assert proxy.logs and all("raw" not in e for e in proxy.logs), proxy.logs
    assert all({"time", "level", "logger", "msg"} <= set(e) for e in proxy.logs)

    text = await proxy_factory(base_config(stable, canary), "--log-format", "text", wait_ready=False)
    line = await text.wait_log(lambda e: str(e.get("raw", "")).rstrip().endswith(": ready"))
    assert re.match(
        r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ INFO canary_proxy\.serve\.single: ready", line["raw"]
    )
    await asyncio.wait_for(stop_proxy(text), 10)


async def test_a_loop_iterations_lines_are_written_after_it_in_whole_lines_within_pipe_buf(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    writes: list[bytes] = []
    real_write = os.write

    def recording_write(fd: int, data: bytes) -> int:
        writes.append(bytes(data))
        return real_write(fd, data)

    monkeypatch.setattr(accesslog.os, "write", recording_write)
    read_end, write_end = os.pipe()
    try:
        log = AccessLog(write_end)
        for i in range(40):
            ex = SimpleNamespace(
                method="GET", path=f"/{i}", client="127.0.0.1", version="stable", rule="weight",
                route="default", status=200, upstream_seconds=None, bytes_in=0, bytes_out=2,
                request_id=f"id-{i}",
            )  # fmt: skip
            log.write(ex, 0.001)
        held = len(writes)
        await asyncio.sleep(0)  # the iteration ends: the rest is written
        data = os.read(read_end, 1 << 20)
    finally:
        os.close(read_end)
        os.close(write_end)
    assert 1 < len(writes) < 40 and held < len(writes)  # batched, not one write per line
    assert all(len(w) <= select.PIPE_BUF and w.endswith(b"\n") for w in writes)  # atomic, whole lines
    assert [json.loads(line)["path"] for line in data.splitlines()] == [f"/{i}" for i in range(40)]
