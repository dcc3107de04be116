"""Ingress mode's certificates, as data: which host gets which Secret, and a Secret's pair.
Pure, no I/O (``tls_store`` validates the pairs and keeps the last good ones).

Which certificate a host gets, as ingress-nginx decides it (``extractTLSSecretName``):

1. Claimed Ingresses are read oldest first (``creationTimestamp``, then NAMESPACE/NAME);
   the first one that gives a host a certificate wins it.
2. An Ingress gives a host a certificate when the host is one of its own rules' hosts and
   is listed in one of its ``spec.tls`` entries' ``hosts`` (case-insensitive): that entry's
   ``secretName`` in the Ingress's namespace, or the default certificate if it names none.
   Failing an exact listing, ingress-nginx takes an entry whose certificate covers the host
   (its SANs); without reading certificates, canary-proxy takes an entry that lists a
   wildcard covering the host (``*.example.com`` for ``a.example.com``), else an entry that
   lists no hosts at all.
3. A host written ``*.example.com`` is a wildcard: at the handshake, the SNI name is looked
   up as is, then with its first label replaced by ``*`` (``a.example.com`` ->
   ``*.example.com``), then the default certificate is served.

Every such host is a *TLS host*: plain-HTTP requests to it are redirected to https unless
its Ingress says ``ssl-redirect: "false"`` (see ``ingress``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

SecretRef = tuple[str, str]  # (namespace, name)
TLS_TYPE: Final = "kubernetes.io/tls"
CERT_KEY: Final = "tls.crt"
KEY_KEY: Final = "tls.key"


class SecretProblem(Exception):
    """Why a Secret gives no certificate; ``reason`` is short and fixed (a metric label)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason  # missing-key, bad-base64, invalid, key-mismatch, not-found, deleted


@dataclass(frozen=True, slots=True)
class Pair:
    """A PEM certificate chain and its key, as a Secret holds them."""

    cert: bytes
    key: bytes
    digest: str = field(init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "digest", hashlib.sha256(self.cert + b"\0" + self.key).hexdigest())


@dataclass(frozen=True, slots=True)
class Certificates:
    """What the HTTPS port serves: each TLS host's pair, and the default one (no SNI, an
    unknown host). Pairs are shared by digest: 200 hosts on one wildcard Secret are one."""

    hosts: Mapping[str, str]  # "shop.example.com" or "*.example.com" -> a digest in ``pairs``
    default: str
    pairs: Mapping[str, Pair]

    def to_wire(self) -> dict[str, Any]:
        """For the workers, as JSON: the PEM in base64 (a Secret's bytes need not be text)."""

        def b64(data: bytes) -> str:
            return base64.b64encode(data).decode("ascii")

        return {
            "hosts": dict(self.hosts),
            "default": self.default,
            "pairs": {d: [b64(p.cert), b64(p.key)] for d, p in self.pairs.items()},
        }

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> Certificates:
        pairs = {d: Pair(base64.b64decode(c), base64.b64decode(k)) for d, (c, k) in data["pairs"].items()}
        return cls(dict(data["hosts"]), data["default"], pairs)


def pair_from_secret(obj: Mapping[str, Any]) -> Pair:
    """A Secret's ``tls.crt`` and ``tls.key`` (base64 in the API's JSON), not yet checked to
    be a valid, matching pair. Raises SecretProblem."""
    data = obj.get("data")
    data = data if isinstance(data, Mapping) else {}
    values = []
    for key in (CERT_KEY, KEY_KEY):
        raw = data.get(key)
        if not isinstance(raw, str) or not raw:
            raise SecretProblem("missing-key", f"no {key} in the Secret")
        try:
            values.append(base64.b64decode(raw, validate=True))
        except (binascii.Error, ValueError):
            raise SecretProblem("bad-base64", f"{key} is not base64") from None
    return Pair(values[0], values[1])


def parse_secret_ref(text: str, *, default_namespace: str = "default") -> SecretRef:
    """``NAMESPACE/NAME`` (or ``NAME`` in ``default_namespace``). ValueError if malformed."""
    namespace, _, name = text.strip().rpartition("/")
    if not name or "/" in namespace:
        raise ValueError("NAMESPACE/NAME")
    return namespace or default_namespace, name


def tls_hosts(ingresses: Iterable[Mapping[str, Any]]) -> dict[str, SecretRef | None]:
    """Each TLS host and the Secret its certificate comes from (None: the default
    certificate), by the rules in the module docstring."""
    found: dict[str, SecretRef | None] = {}
    for ingress in _oldest_first(i for i in ingresses if isinstance(i, Mapping)):
        namespace, _ = _key(ingress)
        spec = ingress.get("spec")
        if not isinstance(spec, Mapping):
            continue
        rule_hosts = {
            str(rule.get("host") or "").lower()
            for rule in spec.get("rules") or []
            if isinstance(rule, Mapping)
        }
        listed: dict[str, SecretRef | None] = {}  # this Ingress's tls hosts, first entry first
        unlisted: list[SecretRef | None] = []  # its entries without hosts
        for entry in spec.get("tls") or []:
            if not isinstance(entry, Mapping):
                continue
            secret = str(entry.get("secretName") or "")
            ref = (namespace, secret) if secret else None
            hosts = [str(h).lower().rstrip(".") for h in entry.get("hosts") or [] if h]
            for name in hosts:
                listed.setdefault(name, ref)
            if not hosts:
                unlisted.append(ref)
        if not listed and not unlisted:
            continue
        for host in sorted(rule_hosts - {""} - found.keys()):
            if host in listed:
                found[host] = listed[host]
            elif (wildcard := host_lookup(host)[1]) is not None and wildcard in listed:
                found[host] = listed[wildcard]
            elif unlisted:
                found[host] = unlisted[0]
    return found


def host_lookup(server_name: str) -> tuple[str, str | None]:
    """The names an SNI ``server_name`` is looked up by: itself, and its wildcard (if any)."""
    name = server_name.lower().rstrip(".")
    dot = name.find(".")
    return name, ("*" + name[dot:] if dot > 0 else None)


def _metadata(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def _key(obj: Mapping[str, Any]) -> tuple[str, str]:
    meta = _metadata(obj)
    return str(meta.get("namespace") or "default"), str(meta.get("name") or "")


def _oldest_first(ingresses: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """As ``ingress._oldest_first``: by creationTimestamp, then NAMESPACE/NAME descending."""
    by_name = sorted(ingresses, key=lambda i: "/".join(_key(i)), reverse=True)
    return sorted(by_name, key=lambda i: str(_metadata(i).get("creationTimestamp") or ""))
