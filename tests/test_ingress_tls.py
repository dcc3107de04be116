"""Ingress mode's TLS: certificates per host from Secrets (SNI), rotation, the last good
pair through a bad update, the default certificate, and the redirect to https."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from prometheus_client import CollectorRegistry

from canary_proxy.address import Address
from canary_proxy.certs import (
    Certificates,
    Pair,
    SecretProblem,
    pair_from_secret,
    parse_secret_ref,
    tls_hosts,
)
from canary_proxy.k8s import KubeClient, load_config
from canary_proxy.metrics import Metrics
from canary_proxy.proxy.exchange import https_location
from canary_proxy.proxy.headers import Peer
from canary_proxy.proxy.request import Request
from canary_proxy.proxy.server import ProxyServer
from canary_proxy.routes import Origin, parse_route
from canary_proxy.selfsigned import SUBJECT_COMMON_NAME, fake_certificate
from canary_proxy.serve.https import open_https
from canary_proxy.serve.public import Public, serve_public
from canary_proxy.serve.settings import Settings
from canary_proxy.sources.secrets import follow_secrets
from canary_proxy.tls import pem_context
from canary_proxy.tls_store import TlsStore

from .conftest import Backend, port_of, raw_request, stop_proxy
from .fakekube import FakeKube
from .test_cli import cli
from .test_ingress_mode import P, serve_ingresses, service
from .test_k8s import FAST
from .test_tls import chain_of

# -- certificates and Secrets ------------------------------------------------------------------


def pair_of(cert: trustme.LeafCert) -> Pair:
    return Pair(chain_of(cert), cert.private_key_pem.bytes())


def secret(
    name: str, pair: Pair | None = None, *, namespace: str = "default", data: dict[str, str] | None = None
) -> dict[str, Any]:
    if pair is not None:
        data = {
            "tls.crt": base64.b64encode(pair.cert).decode(),
            "tls.key": base64.b64encode(pair.key).decode(),
        }
    return {
        "metadata": {"name": name, "namespace": namespace},
        "type": "kubernetes.io/tls",
        "data": data or {},
    }


def ingress(
    name: str,
    hosts: list[str],
    tls: list[dict[str, Any]],
    *,
    created: str = "2026-01-01T00:00:00Z",
    port: int = 80,
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    backend = {"service": {"name": "web", "port": {"number": port}}}
    return {
        "metadata": {
            "name": name,
            "namespace": "default",
            "creationTimestamp": created,
            "annotations": annotations or {},
        },
        "spec": {
            "ingressClassName": "canary-proxy",
            "tls": tls,
            "rules": [
                {"host": h, "http": {"paths": [{"path": "/", "pathType": "Prefix", "backend": backend}]}}
                for h in hosts
            ],
        },
    }


def test_tls_hosts_follow_ingress_nginx() -> None:
    old = ingress("old", ["a.example", "B.example", "*.wild.example", "x.star.example"], [
        {"hosts": ["a.example", "b.example"], "secretName": "ab"},
        {"hosts": ["*.wild.example", "*.star.example"], "secretName": "wild"},  # covers x.star too
        {"hosts": ["not-a-rule.example"], "secretName": "x"},  # no rule of its own: not a TLS host
    ])  # fmt: skip
    new = ingress("new", ["a.example", "c.example"], [
        {"hosts": ["a.example"], "secretName": "late"},  # a.example is old's already
        {"hosts": ["c.example"]},  # no secretName: the default certificate
    ], created="2026-02-01T00:00:00Z")  # fmt: skip
    bare = ingress("bare", ["d.example"], [{"secretName": "any"}])  # no hosts: every rule host
    assert tls_hosts([new, bare, old]) == {
        "a.example": ("default", "ab"),
        "b.example": ("default", "ab"),
        "*.wild.example": ("default", "wild"),
        "x.star.example": ("default", "wild"),
        "c.example": None,
        "d.example": ("default", "any"),
    }


def test_a_secret_must_hold_both_keys_in_base64() -> None:
    for obj, reason in [
        (secret("s", data={"tls.crt": "QQ=="}), "missing-key"),
        (secret("s", data={"tls.crt": "QQ==", "tls.key": "not base64!"}), "bad-base64"),
    ]:
        with pytest.raises(SecretProblem) as caught:
            pair_from_secret(obj)
        assert caught.value.reason == reason
    assert parse_secret_ref("ns/name") == ("ns", "name")
    assert parse_secret_ref("name", default_namespace="x") == ("x", "name")


def test_certificates_travel_to_workers_whole() -> None:
    fake = Pair(*fake_certificate())
    certs = Certificates({"a.example": fake.digest}, fake.digest, {fake.digest: fake})
    assert Certificates.from_wire(certs.to_wire()) == certs


def test_the_store_keeps_the_last_good_pair_and_reports_each_problem_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ca = trustme.CA()
    good, other = pair_of(ca.issue_cert("a.example")), pair_of(ca.issue_cert("a.example"))
    fake = Pair(*fake_certificate())
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    seen: list[Certificates] = []
    store = TlsStore(fallback=fake, metrics=metrics, on_change=[seen.append])
    store.ingresses(
        {("default", "i"): ingress("i", ["a.example"], [{"hosts": ["a.example"], "secretName": "a"}])}
    )
    assert store.current.hosts == {"a.example": fake.digest}  # not found yet: the default
    assert not store.problems and not store.listed  # the Secrets are not listed yet: no news
    store.secrets([])  # listed: it is not there
    assert store.problems[("default", "a")].reason == "not-found"

    def problem(reason: str) -> float | None:
        return registry.get_sample_value(
            "canary_proxy_tls_secret_problem", {"secret": "default/a", "reason": reason}
        )

    store.secrets([(("default", "a"), secret("a", good) | {"metadata": {"resourceVersion": "1"}})])
    assert store.current.hosts == {"a.example": good.digest} and not store.problems
    mismatched = secret("a", Pair(good.cert, other.key))
    caplog.clear()
    for version in ("2", "3"):  # the same problem twice: logged once
        store.secrets([(("default", "a"), mismatched | {"metadata": {"resourceVersion": version}})])
    assert store.current.hosts == {"a.example": good.digest}  # kept
    assert [r.message for r in caplog.records if r.levelname == "ERROR"] == [
        "TLS Secret default/a: "
        + str(store.problems[("default", "a")])
        + "; keeping its last good certificate"
    ]
    assert problem("key-mismatch") == 1
    store.secrets([(("default", "a"), None)])
    assert store.problems[("default", "a")].reason == "deleted"
    assert (problem("key-mismatch"), problem("deleted")) == (0, 1)
    store.secrets([(("default", "a"), secret("a", other) | {"metadata": {"resourceVersion": "4"}})])
    assert store.current.hosts == {"a.example": other.digest} and not store.problems
    assert [c.hosts["a.example"] for c in seen] == [fake.digest, good.digest, other.digest]


def test_the_fake_certificate_is_ingress_nginx_s() -> None:
    cert, key = fake_certificate()
    pem_context(cert, key, origin="fake")  # OpenSSL takes it, and the key matches
    parsed = x509.load_pem_x509_certificate(cert)
    assert SUBJECT_COMMON_NAME in parsed.subject.rfc4514_string()
    public = parsed.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey) and parsed.signature_hash_algorithm is not None
    public.verify(parsed.signature, parsed.tbs_certificate_bytes, ec.ECDSA(parsed.signature_hash_algorithm))


@pytest.mark.parametrize(
    ("host", "url", "trusted", "proto", "location"),
    [
        (b"shop.example:8080", b"/a/b?c=1", False, None, b"https://shop.example/a/b?c=1"),
        (b"[::1]:80", b"/", False, None, b"https://[::1]/"),
        (b"shop.example", b"http://other/x?y", False, None, b"https://shop.example/x?y"),
        (b"shop.example", b"/", True, b"https", None),  # a trusted proxy saw https
        (b"shop.example", b"/", False, b"https", b"https://shop.example/"),  # anyone else: ignored
        (None, b"/", False, None, None),
    ],
)
def test_https_location(
    host: bytes | None, url: bytes, trusted: bool, proto: bytes | None, location: bytes | None
) -> None:
    request = Request.__new__(Request)
    lookup = {b"host": host, b"x-forwarded-proto": proto}
    request.lookup = {k: v for k, v in lookup.items() if v is not None}
    request.url = url
    peer = Peer.of("10.0.0.1", secure=False, port=b"80", trusted=trusted)
    assert https_location(request, peer) == location


# -- the HTTPS port, end to end ------------------------------------------------------------------


@dataclass
class Edge:
    """A proxy with a plain and an HTTPS port, certificates from the fake API's Secrets."""

    proxy: ProxyServer
    plain: Public
    https: Public
    store: TlsStore

    def connect(self, server_name: str | None, ctx: ssl.SSLContext) -> Any:
        return asyncio.open_connection(
            "127.0.0.1", self.https.address.port, ssl=ctx, server_hostname=server_name or ""
        )


def trusting(*cas: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    for ca in cas:
        ca.configure_trust(ctx)
    return ctx


async def peer_cert(edge: Edge, server_name: str | None, ctx: ssl.SSLContext) -> bytes:
    _, writer = await edge.connect(server_name, ctx)
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()
    return bytes(der)


def der(pair: Pair) -> bytes:
    return ssl.PEM_cert_to_DER_cert(
        pair.cert.decode().split("-----END CERTIFICATE-----")[0] + "-----END CERTIFICATE-----\n"
    )


async def until(check: Callable[[], Any], *, deadline: float = 5.0) -> Any:
    """Poll ``check`` (awaited if it returns an awaitable) until it is truthy, or fail."""
    end = time.monotonic() + deadline
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        assert time.monotonic() < end, "timed out"
        await asyncio.sleep(0.02)


@pytest.fixture
async def edge(fake_kube: FakeKube, backends: tuple[Backend, Backend]) -> AsyncIterator[Edge]:
    stable, _ = backends
    metrics = Metrics(CollectorRegistry())
    proxy = ProxyServer(metrics=metrics, access_log=None)
    routes = []
    for number, (host, redirect) in enumerate(
        [("a.example", True), ("b.example", True), ("plain.example", False)]
    ):
        route = parse_route(
            {"host": host, "stable-url": stable.url, "canary-url": stable.url}, name=f"default/i#{number}"
        )
        origin = Origin("default", "i", "web", host, "/", ssl_redirect=redirect)
        routes.append(replace(route, origin=origin))
    proxy.apply_routes(routes)
    settings = Settings(tls_listen=Address("127.0.0.1", 0))
    store = TlsStore(fallback=Pair(*fake_certificate()), metrics=metrics)
    plain = await serve_public(proxy, Address("127.0.0.1", 0))
    https, sni = await open_https(proxy, settings, store.current)
    store.on_change.append(sni.apply)
    store.ingresses({("default", "i"): ingress("i", ["a.example", "b.example"], [
        {"hosts": ["a.example"], "secretName": "a"}, {"hosts": ["b.example"], "secretName": "b"},
    ])})  # fmt: skip
    async with KubeClient(await load_config(fake_kube.kubeconfig), backoff=FAST) as client:
        watch = asyncio.create_task(follow_secrets(store, client, namespace=None, backoff=FAST))
        try:
            yield Edge(proxy, plain, https, store)
        finally:
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)
            for public in (plain, https):
                public.server.close()
            await proxy.close()


async def test_sni_picks_each_host_s_certificate_and_a_rotation_is_picked_up(
    edge: Edge, fake_kube: FakeKube
) -> None:
    ca, new_ca = trustme.CA(), trustme.CA()
    a, b = pair_of(ca.issue_cert("a.example")), pair_of(ca.issue_cert("b.example"))
    fake_kube.put_object("secrets", secret("a", a))
    fake_kube.put_object("secrets", secret("b", b))
    fake_kube.put_object(
        "secrets", {"metadata": {"name": "junk"}, "type": "Opaque", "data": {}}
    )  # never seen
    ctx = trusting(ca, new_ca)
    await until(lambda: edge.store.current.hosts.get("b.example") == b.digest)
    assert await peer_cert(edge, "a.example", ctx) == der(a)
    assert await peer_cert(edge, "B.Example", ctx) == der(b)

    reader, writer = await edge.connect("a.example", ctx)  # open across the rotation
    rotated = pair_of(new_ca.issue_cert("a.example"))
    fake_kube.put_object("secrets", secret("a", rotated))
    await until(lambda: _is(edge, "a.example", ctx, der(rotated)))
    with pytest.raises(ssl.SSLCertVerificationError):  # the old CA no longer vouches for a.example
        await peer_cert(edge, "a.example", trusting(ca))
    writer.write(b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n")
    assert (await reader.readline()).startswith(b"HTTP/1.1 200")  # the open connection lives on
    assert writer.get_extra_info("ssl_object").getpeercert(binary_form=True) == der(a)
    writer.close()

    fake_kube.put_object("secrets", secret("a", Pair(rotated.cert, b.key)))  # key mismatch
    fake_kube.delete_object("secrets", "b")
    await until(lambda: {"a", "b"} <= {ref[1] for ref in edge.store.problems})
    assert await peer_cert(edge, "a.example", ctx) == der(rotated)  # the last good ones serve on
    assert await peer_cert(edge, "b.example", ctx) == der(b)


async def _is(edge: Edge, name: str, ctx: ssl.SSLContext, expected: bytes) -> bool:
    return await peer_cert(edge, name, ctx) == expected


async def test_unknown_hosts_and_no_sni_get_the_fake_certificate(edge: Edge) -> None:
    loose = ssl.create_default_context()
    loose.check_hostname, loose.verify_mode = False, ssl.CERT_NONE
    for name in ("unknown.example", None):
        cert = x509.load_der_x509_certificate(await peer_cert(edge, name, loose))
        assert SUBJECT_COMMON_NAME in cert.subject.rfc4514_string()


async def test_plain_http_to_a_tls_host_is_redirected_and_https_is_proxied(
    edge: Edge, fake_kube: FakeKube, backends: tuple[Backend, Backend]
) -> None:
    stable, _ = backends
    port = edge.plain.address.port
    answer = await raw_request(port, b"GET /cart?id=7 HTTP/1.1\r\nHost: a.example:8080\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 308 Permanent Redirect\r\n")
    assert b"\r\nLocation: https://a.example/cart?id=7\r\n" in answer
    assert stable.hits == 0
    answer = await raw_request(port, b"GET / HTTP/1.1\r\nHost: plain.example\r\n\r\n")  # ssl-redirect off
    assert answer.startswith(b"HTTP/1.1 200")
    ca = trustme.CA()
    a = pair_of(ca.issue_cert("a.example"))
    fake_kube.put_object("secrets", secret("a", a))
    await until(lambda: edge.store.current.hosts.get("a.example") == a.digest)
    reader, writer = await edge.connect("a.example", trusting(ca))
    writer.write(b"GET /cart HTTP/1.1\r\nHost: a.example\r\n\r\n")
    assert (await reader.readline()).startswith(b"HTTP/1.1 200")
    writer.close()
    assert stable.requests[-1]["path"] == "/cart"


# -- serve --ingress-class, the real process --------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
async def test_serve_ingress_class_serves_each_host_s_secret_rotates_and_redirects(
    fake_kube: FakeKube, backends: tuple[Backend, Backend], tmp_path: Path, workers: int
) -> None:
    stable, _ = backends
    ca, new_ca = trustme.CA(), trustme.CA()
    a, b = pair_of(ca.issue_cert("a.example")), pair_of(ca.issue_cert("b.example"))
    fake_kube.put_object("services", service("web", stable))
    fake_kube.put_object("secrets", secret("a", a))
    fake_kube.put_object("secrets", secret("b", b))
    tls = [{"hosts": ["a.example"], "secretName": "a"}, {"hosts": ["b.example"], "secretName": "b"}]
    off = {P + "ssl-redirect": "false"}
    fake_kube.put_object("ingresses", ingress("shop", ["a.example"], tls, port=stable.port))
    fake_kube.put_object("ingresses", ingress("blog", ["b.example"], tls, port=stable.port, annotations=off))
    proxy = await serve_ingresses(fake_kube, tmp_path, "--workers", str(workers))
    try:
        ready = next(e for e in proxy.logs if e.get("msg") == "ready")
        port = int(ready["https"].rpartition(":")[2])
        ctx = trusting(ca, new_ca)

        async def served(name: str) -> bytes:
            _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=name)
            der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
            writer.close()
            return bytes(der)

        async def every_worker_serves(name: str, expected: bytes) -> bool:
            return all([await served(name) == expected for _ in range(4 * workers)])

        await until(lambda: every_worker_serves("a.example", der(a)))
        assert await every_worker_serves("b.example", der(b))
        rotated = pair_of(new_ca.issue_cert("a.example"))
        fake_kube.put_object("secrets", secret("a", rotated))
        await until(lambda: every_worker_serves("a.example", der(rotated)))

        plain = port_of(proxy.url)
        answer = await raw_request(plain, b"GET /x?y=1 HTTP/1.1\r\nHost: a.example\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 308 ") and b"\r\nLocation: https://a.example/x?y=1\r\n" in answer
        answer = await raw_request(plain, b"GET / HTTP/1.1\r\nHost: b.example\r\n\r\n")  # ssl-redirect off
        assert answer.startswith(b"HTTP/1.1 200 ")
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, server_hostname="a.example"
        )
        writer.write(b"GET /x HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n")
        assert (await reader.readline()).startswith(b"HTTP/1.1 200 ")
        writer.close()
    finally:
        await stop_proxy(proxy)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--config", "x.yaml", "--tls-listen", "127.0.0.1:0"], "go with --ingress-class"),
        (["--config", "x.yaml", "--default-tls-secret", "a/b"], "go with --ingress-class"),
        (["--ingress-class", "--tls-cert", "c", "--tls-key", "k"], "certificates come from the Ingresses"),
        (["--ingress-class", "--tls-listen", "nowhere"], "--tls-listen: invalid value"),
        (["--ingress-class", "--default-tls-secret", "a/b/c"], "--default-tls-secret: invalid value"),
        (["--ingress-class", "--tls-listen", "off", "--default-tls-secret", "a/b"], "needs the HTTPS port"),
    ],
)
def test_tls_flags_are_checked_at_start(args: list[str], message: str) -> None:
    result = cli("serve", *args)
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_the_default_secret_serves_the_rest_and_the_placeholder_stands_in_until_it_loads() -> None:
    ca = trustme.CA()
    fake, default = Pair(*fake_certificate()), pair_of(ca.issue_cert("anything.example"))
    store = TlsStore(fallback=fake, default_secret=("ingress", "default-cert"))
    store.ingresses({("shop", "i"): ingress("i", ["a.example"], [{"hosts": ["a.example"]}])})  # no secretName
    assert store.current.default == fake.digest
    store.secrets([(("ingress", "default-cert"), secret("default-cert", Pair(default.cert, fake.key)))])
    assert store.current.default == fake.digest  # a mismatched pair: never served
    assert store.problems[("ingress", "default-cert")].reason == "key-mismatch"
    store.secrets([(("ingress", "default-cert"), secret("default-cert", default))])
    assert store.current.default == default.digest and store.current.hosts == {"a.example": default.digest}
    assert not store.problems
