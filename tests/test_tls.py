"""TLS on the public port (with live certificate rotation) and to https upstreams, with
throwaway CAs made by trustme in each test."""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import trustme

from .conftest import Backend, ProxyFactory, ProxyProcess, base_config, port_of, start_backend
from .scrape import scrape
from .test_cli import cli


class SecretMount:
    """A directory laid out like a Kubernetes Secret volume: ``tls.crt`` and ``tls.key`` are
    symlinks through ``..data``, which the kubelet re-points atomically on every update."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir()
        self.cert = str(root / "tls.crt")
        self.key = str(root / "tls.key")
        self._generation = 0

    def write(self, chain: bytes, key: bytes) -> None:
        self._generation += 1
        version = self.root / f"..2026_11_26_{self._generation}"
        version.mkdir()
        (version / "tls.crt").write_bytes(chain)
        (version / "tls.key").write_bytes(key)
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(version.name)
        os.replace(tmp, self.root / "..data")
        for name in ("tls.crt", "tls.key"):
            link = self.root / name
            if not link.is_symlink():
                link.symlink_to(f"..data/{name}")

    def install(self, cert: trustme.LeafCert) -> None:
        self.write(chain_of(cert), cert.private_key_pem.bytes())


def chain_of(cert: trustme.LeafCert) -> bytes:
    return b"".join(blob.bytes() for blob in cert.cert_chain_pems)


def der_of(cert: trustme.LeafCert) -> bytes:
    return ssl.PEM_cert_to_DER_cert(cert.cert_chain_pems[0].bytes().decode())


def client_context(*cas: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    for ca in cas:
        ca.configure_trust(ctx)
    return ctx


def https(proxy: ProxyProcess) -> str:
    return proxy.url.replace("http://", "https://", 1)


Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def open_tls(proxy: ProxyProcess, ctx: ssl.SSLContext) -> Stream:
    return await asyncio.open_connection("127.0.0.1", port_of(proxy.url), ssl=ctx)


def peer_der(stream: Stream) -> bytes:
    ssl_object = stream[1].get_extra_info("ssl_object")
    der = ssl_object.getpeercert(binary_form=True)
    assert der is not None
    return bytes(der)


async def get(stream: Stream, path: str = "/") -> tuple[bytes, bytes]:
    """One keep-alive GET on an open connection: the status line and the body."""
    reader, writer = stream
    writer.write(b"GET %s HTTP/1.1\r\nHost: shop.example\r\n\r\n" % path.encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    body = await asyncio.wait_for(reader.readexactly(length), 5)
    return head.split(b"\r\n", 1)[0], body


async def close(stream: Stream) -> None:
    stream[1].close()
    with contextlib.suppress(Exception):
        await stream[1].wait_closed()


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def mount(tmp_path: Path, ca: trustme.CA) -> SecretMount:
    mount = SecretMount(tmp_path / "tls")
    mount.install(ca.issue_cert("127.0.0.1", "localhost"))
    return mount


async def test_the_public_port_speaks_tls_and_says_so_upstream(
    backends: tuple[Backend, Backend], proxy_factory: ProxyFactory, ca: trustme.CA, mount: SecretMount
) -> None:
    stable, canary = backends
    proxy = await proxy_factory(base_config(stable, canary), "--tls-cert", mount.cert, "--tls-key", mount.key)
    connector = aiohttp.TCPConnector(ssl=client_context(ca))
    async with aiohttp.ClientSession(connector=connector) as client, client.get(https(proxy) + "/a?b=1") as r:
        assert r.status == 200
        seen = dict((await r.json())["headers"])
    assert seen["X-Forwarded-Proto"] == "https"
    assert stable.requests[-1]["path"] == "/a?b=1"


async def test_a_rotated_certificate_serves_new_connections_and_keeps_open_ones(
    backends: tuple[Backend, Backend], proxy_factory: ProxyFactory, ca: trustme.CA, mount: SecretMount
) -> None:
    stable, canary = backends
    proxy = await proxy_factory(base_config(stable, canary), "--tls-cert", mount.cert, "--tls-key", mount.key)
    new_ca = trustme.CA()
    trusting = client_context(ca, new_ca)
    old = await open_tls(proxy, trusting)
    first = peer_der(old)
    assert (await get(old))[0] == b"HTTP/1.1 200 OK"

    renewed = new_ca.issue_cert("127.0.0.1")
    mark = len(proxy.logs)
    mount.install(renewed)  # the kubelet's ..data swap
    await proxy.wait_log(lambda e: str(e.get("msg", "")).startswith("TLS certificate reloaded"), since=mark)

    new = await open_tls(proxy, trusting)
    assert peer_der(new) == der_of(renewed) != first
    assert (await get(new))[0] == b"HTTP/1.1 200 OK"
    assert (await get(old))[0] == b"HTTP/1.1 200 OK"  # the open keep-alive connection lives on
    assert peer_der(old) == first
    with pytest.raises(ssl.SSLCertVerificationError):  # the old CA no longer vouches for us
        await open_tls(proxy, client_context(ca))
    await close(old)
    await close(new)


async def test_a_bad_new_certificate_is_rejected_and_the_old_one_keeps_serving(
    backends: tuple[Backend, Backend], proxy_factory: ProxyFactory, ca: trustme.CA, mount: SecretMount
) -> None:
    stable, canary = backends
    proxy = await proxy_factory(base_config(stable, canary), "--tls-cert", mount.cert, "--tls-key", mount.key)
    served = peer_der(stream := await open_tls(proxy, client_context(ca)))
    await close(stream)
    other = ca.issue_cert("127.0.0.1")
    for chain, key in [
        (chain_of(other), ca.issue_cert("127.0.0.1").private_key_pem.bytes()),  # not its key
        (b"-----BEGIN CERTIFICATE-----\nnot base64\n", other.private_key_pem.bytes()),
    ]:
        mark = len(proxy.logs)
        mount.write(chain, key)
        entry = await proxy.wait_log(lambda e: "TLS certificate" in str(e.get("msg", "")), since=mark)
        assert entry["msg"].startswith("rejected the new TLS certificate"), entry
        stream = await open_tls(proxy, client_context(ca))
        assert peer_der(stream) == served
        assert (await get(stream))[0] == b"HTTP/1.1 200 OK"
        await close(stream)


async def test_tls_flags_are_checked_at_start(
    backends: tuple[Backend, Backend], proxy_factory: ProxyFactory, mount: SecretMount, tmp_path: Path
) -> None:
    stable, canary = backends
    for args in (["--tls-cert", mount.cert], ["--tls-cert", mount.cert, "--tls-key", str(tmp_path / "nope")]):
        proxy = await proxy_factory(base_config(stable, canary), *args, wait_ready=False)
        assert await asyncio.wait_for(proxy.process.wait(), 20) == 2


async def test_every_worker_serves_tls_and_rotates_its_certificate(
    backends: tuple[Backend, Backend], proxy_factory: ProxyFactory, ca: trustme.CA, mount: SecretMount
) -> None:
    stable, canary = backends
    proxy = await proxy_factory(
        base_config(stable, canary), "--workers", "2", "--tls-cert", mount.cert, "--tls-key", mount.key
    )
    connector = aiohttp.TCPConnector(ssl=client_context(ca), force_close=True)
    async with aiohttp.ClientSession(connector=connector) as client:
        for _ in range(4):
            async with client.get(https(proxy) + "/") as r:
                assert r.status == 200
    renewed = ca.issue_cert("127.0.0.1")
    mark = len(proxy.logs)
    mount.install(renewed)
    reloaded = "TLS certificate reloaded"
    await proxy.wait_log(lambda e: str(e.get("msg", "")).startswith(reloaded), since=mark)
    await proxy.wait_log(  # the second worker's line
        lambda e: sum(str(x.get("msg", "")).startswith(reloaded) for x in proxy.logs[mark:]) >= 2, since=mark
    )
    for _ in range(8):  # SO_REUSEPORT spreads these over both workers
        stream = await open_tls(proxy, client_context(ca))
        assert peer_der(stream) == der_of(renewed)
        await close(stream)


# -- https upstreams -------------------------------------------------------------------------


@pytest.fixture
async def https_backend(ca: trustme.CA) -> AsyncIterator[Backend]:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(ctx)
    backend = await start_backend("stable", ssl_context=ctx)
    yield backend
    await backend.stop()


async def test_https_upstreams_are_verified_against_upstream_ca(
    backends: tuple[Backend, Backend],
    proxy_factory: ProxyFactory,
    client: aiohttp.ClientSession,
    ca: trustme.CA,
    https_backend: Backend,
    tmp_path: Path,
) -> None:
    """Without ``upstream-ca`` the system CAs do not know the upstream's issuer: 502, counted
    as a ``connect`` error (the TLS handshake is part of connecting, so a canary with a bad
    certificate fails over to stable like one that refuses connections)."""
    _, canary = backends
    config = {"stable-url": https_backend.url, "canary-url": canary.url}
    proxy = await proxy_factory(config)
    async with client.get(proxy.url + "/") as r:
        assert r.status == 502
    assert (await scrape(proxy)).value(
        "canary_proxy_upstream_errors_total", version="stable", reason="connect"
    ) == 1
    assert https_backend.hits == 0

    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    await proxy.reload({**config, "upstream-ca": str(bundle)})
    started = time.monotonic()
    async with client.get(proxy.url + "/x") as r:
        assert r.status == 200
        assert (await r.json())["version"] == "stable"
    assert time.monotonic() - started < 5
    assert https_backend.hits == 1

    await proxy.reload({**config, "upstream-ca": str(tmp_path / "missing.pem")}, expect_ok=False)
    async with client.get(proxy.url + "/y") as r:  # the last good config, and its CA, serve on
        assert r.status == 200


def test_check_rejects_an_upstream_ca_that_cannot_be_loaded(tmp_path: Path, ca: trustme.CA) -> None:
    good, junk = tmp_path / "ca.pem", tmp_path / "junk.pem"
    ca.cert_pem.write_to_path(str(good))
    junk.write_text("not a certificate\n")
    for bundle, code in [(good, 0), (junk, 2), (tmp_path / "missing.pem", 2)]:
        path = tmp_path / "c.yaml"
        path.write_text(f"stable-url: https://s:443\ncanary-url: http://c:80\nupstream-ca: {bundle}\n")
        result = cli("check", "--config", str(path))
        assert result.returncode == code, result.stderr
        if code:
            assert result.stderr.startswith("error: upstream-ca: "), result.stderr
