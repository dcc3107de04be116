"""Never an open proxy; malformed requests get a 400 and the process stays up."""

from __future__ import annotations

import aiohttp
import pytest

from .conftest import Backend, ProxyFactory, base_config, port_of, raw_request


async def test_absolute_form_is_routed_by_its_path_to_the_configured_upstream_only(
    backends: tuple[Backend, Backend], proxy_factory: ProxyFactory
) -> None:
    stable, canary = backends
    proxy = await proxy_factory(base_config(stable, canary))
    port = port_of(proxy.url)
    for target, path in [
        (b"http://169.254.169.254/latest/meta-data?x=1", "/latest/meta-data?x=1"),
        (b"http://example.com", "/"),
        (b"https://example.com:8443?q=1", "/?q=1"),
    ]:
        response = await raw_request(port, b"GET " + target + b" HTTP/1.1\r\nHost: example.com\r\n\r\n")
        assert response.startswith(b"HTTP/1.1 200"), response[:200]
        assert stable.requests[-1]["path"] == path
    assert stable.hits == 3


async def test_connect_is_405(backends: tuple[Backend, Backend], proxy_factory: ProxyFactory) -> None:
    stable, canary = backends
    proxy = await proxy_factory(base_config(stable, canary))
    response = await raw_request(
        port_of(proxy.url), b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"
    )
    assert response.startswith(b"HTTP/1.1 405")
    assert stable.hits == 0 and canary.hits == 0


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/9.9\r\nHost: x\r\n\r\n",
        b"GET /\x00 HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        # identical duplicates too, strictly, as nginx does
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3,3\r\n\r\nabc",
        # obs-fold (a header continued on the next line) and a bare CR in a value
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Folded: a\r\n b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nX-CR: a\rb\r\n\r\n",
        # an obfuscated Transfer-Encoding beside a Content-Length
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: \tchunked\r\n\r\nabc",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    ],
)
async def test_malformed_requests_get_400_and_never_reach_an_upstream(
    backends: tuple[Backend, Backend], proxy_factory: ProxyFactory, request_bytes: bytes
) -> None:
    stable, canary = backends
    proxy = await proxy_factory(base_config(stable, canary))
    response = await raw_request(port_of(proxy.url), request_bytes)
    assert response.split(b" ", 2)[1] == b"400", response[:200]
    assert stable.hits == 0 and canary.hits == 0
    async with aiohttp.ClientSession() as s, s.get(proxy.url + "/") as r:
        assert r.status == 200  # still up
    assert proxy.process.returncode is None


async def test_admin_endpoints_are_not_on_the_public_port(
    backends: tuple[Backend, Backend], proxy_factory: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    stable, canary = backends
    proxy = await proxy_factory(base_config(stable, canary))
    for path in ("/metrics", "/healthz", "/readyz", "/config"):
        async with client.get(proxy.url + path) as r:
            assert r.headers["X-Canary-Version"] == "stable"  # proxied, not answered by us
            assert (await r.json())["path"] == path
    async with client.get(proxy.admin_url + "/healthz") as r:
        assert r.status == 200


async def test_a_malformed_chunked_body_is_400_and_the_upstream_never_gets_a_whole_request(
    backends: tuple[Backend, Backend], proxy_factory: ProxyFactory
) -> None:
    """Bodies stream, so the head may already be upstream when a bad chunk arrives: the
    upstream connection is then aborted mid-body, and the request never completes there."""
    stable, canary = backends
    proxy = await proxy_factory(base_config(stable, canary))
    response = await raw_request(
        port_of(proxy.url),
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n",
    )
    assert response.split(b" ", 2)[1] == b"400", response[:200]
    assert stable.requests == [] and canary.requests == []
    async with aiohttp.ClientSession() as s, s.get(proxy.url + "/") as r:
        assert r.status == 200
