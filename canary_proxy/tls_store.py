"""Ingress mode's certificate store: claimed Ingresses and TLS Secrets in, one
``Certificates`` value out, with every Secret's last good pair kept through bad updates.

Which host gets which Secret is ``certs.tls_hosts``. Here each Secret an Ingress names (and
``--default-tls-secret``) is validated when it changes: both keys present, base64, a PEM
chain and key that OpenSSL loads and that match. A Secret that fails -- or is deleted, or
never existed -- keeps serving its last good pair to its hosts; one that never had one
leaves its hosts on the default certificate. Each distinct problem is logged once (error)
and shown as ``canary_proxy_tls_secret_problem{secret, reason} 1`` until it is fixed
(logged too). The default certificate is ``--default-tls-secret``'s, else a self-signed
placeholder made at start (``selfsigned``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .certs import Certificates, Pair, SecretProblem, SecretRef, pair_from_secret, tls_hosts
from .metrics import Metrics
from .tls import TlsError, pem_context

log = logging.getLogger(__name__)

OnCertificates = Callable[[Certificates], None]
IngressKey = tuple[str, str]


def validate(pair: Pair, *, origin: str) -> None:
    """Raises SecretProblem unless OpenSSL takes the pair (a chain, and the key that matches)."""
    try:
        pem_context(pair.cert, pair.key, origin=origin)
    except TlsError as exc:
        text = re.sub(r" \(_ssl\.c:\d+\)$", "", str(exc))  # where in CPython: no news to a user
        reason = "key-mismatch" if "KEY_VALUES_MISMATCH" in text else "invalid"
        raise SecretProblem(reason, text.removeprefix(f"{origin}: ")) from None


class TlsStore:
    """``ingresses`` and ``secrets`` in; ``current`` out, and to ``on_change`` when it changes."""

    def __init__(
        self,
        *,
        fallback: Pair,
        default_secret: SecretRef | None = None,
        metrics: Metrics | None = None,
        on_change: Iterable[OnCertificates] = (),
    ) -> None:
        self.fallback = fallback  # the placeholder, while the default Secret has no good pair
        self.default_secret = default_secret
        self.metrics = metrics
        self.on_change = list(on_change)
        self.on_listed: list[Callable[[], None]] = []  # called once, when the Secrets are first listed
        self.hosts: dict[str, SecretRef | None] = {}
        # The Secrets were listed once: only then is a Secret not found a problem (and the
        # certificates ready: /readyz waits for it, so no client meets a placeholder).
        self.listed = False
        self.problems: dict[SecretRef, SecretProblem] = {}
        self._secrets: dict[SecretRef, Mapping[str, Any]] = {}  # the latest of each TLS Secret
        self._checked: dict[SecretRef, str] = {}  # the resourceVersion last validated
        self._good: dict[SecretRef, Pair] = {}
        self.current = Certificates({}, fallback.digest, {fallback.digest: fallback})

    # -- inputs ----------------------------------------------------------------------------

    def ingresses(self, claimed: Mapping[IngressKey, Mapping[str, Any]]) -> None:
        """IngressMode's ``on_claimed_ingresses`` listener: every claimed Ingress, each change."""
        self.hosts = tls_hosts(claimed.values())
        self._update()

    def secrets(self, events: Iterable[tuple[SecretRef, Mapping[str, Any] | None]]) -> None:
        """Secrets as the watch saw them: the object, or None once deleted."""
        first, self.listed = not self.listed, True
        for ref, obj in events:
            if obj is None:
                self._secrets.pop(ref, None)
            else:
                self._secrets[ref] = obj
        self._update()
        if first:
            for callback in self.on_listed:
                callback()

    # -- the one recomputation ---------------------------------------------------------------

    def _update(self) -> None:
        referenced = {ref for ref in self.hosts.values() if ref is not None}
        if self.default_secret is not None:
            referenced.add(self.default_secret)
        for ref in referenced:
            self._check(ref)
        for ref in [r for r in self._good if r not in referenced]:
            del self._good[ref]
        for ref in [r for r in self.problems if r not in referenced]:
            self._solved(ref, "no longer used")
        for ref in [r for r in self._checked if r not in referenced]:
            del self._checked[ref]
        default = (self._good.get(self.default_secret) if self.default_secret else None) or self.fallback
        pairs = {default.digest: default}
        hosts: dict[str, str] = {}
        for host, source in self.hosts.items():
            pair = (self._good.get(source) if source is not None else None) or default
            pairs[pair.digest] = pair
            hosts[host] = pair.digest
        new = Certificates(hosts, default.digest, pairs)
        if new != self.current:
            self.current = new
            log.info(
                "TLS certificates updated: %d hosts, %d certificates",
                len(hosts),
                len(pairs),
                extra={"tls_hosts": sorted(hosts)},
            )
            for callback in self.on_change:
                callback(new)

    def _check(self, ref: SecretRef) -> None:
        obj = self._secrets.get(ref)
        name = "/".join(ref)
        if obj is None:
            self._checked.pop(ref, None)
            if not self.listed:
                return  # not yet known to be missing
            if ref in self._good:
                self._problem(ref, SecretProblem("deleted", f"Secret {name} was deleted"))
            else:
                self._problem(ref, SecretProblem("not-found", f"no {_TYPE_NOTE} Secret {name}"))
            return
        version = str((obj.get("metadata") or {}).get("resourceVersion") or id(obj))
        if self._checked.get(ref) == version:
            return
        self._checked[ref] = version
        try:
            pair = pair_from_secret(obj)
            if self._good.get(ref) != pair:
                validate(pair, origin=name)
        except SecretProblem as problem:
            self._problem(ref, problem)
            return
        self._good[ref] = pair
        if ref in self.problems:
            self._solved(ref, "loaded")

    # -- reporting -----------------------------------------------------------------------------

    def _problem(self, ref: SecretRef, problem: SecretProblem) -> None:
        old = self.problems.get(ref)
        if old is not None and (old.reason, str(old)) == (problem.reason, str(problem)):
            return  # logged and counted already
        self.problems[ref] = problem
        name = "/".join(ref)
        if self.metrics is not None:
            if old is not None:
                self.metrics.tls_secret_problems.labels(name, old.reason).set(0)
            self.metrics.tls_secret_problems.labels(name, problem.reason).set(1)
        keeping = (
            "keeping its last good certificate" if ref in self._good else "serving the default certificate"
        )
        hosts = sorted(h for h, r in self.hosts.items() if r == ref)
        log.error(
            "TLS Secret %s: %s; %s",
            name,
            problem,
            keeping,
            extra={"secret": name, "reason": problem.reason, "tls_hosts": hosts},
        )

    def _solved(self, ref: SecretRef, how: str) -> None:
        old = self.problems.pop(ref)
        name = "/".join(ref)
        if self.metrics is not None:
            self.metrics.tls_secret_problems.labels(name, old.reason).set(0)
        log.info("TLS Secret %s: %s", name, how, extra={"secret": name})


_TYPE_NOTE = "kubernetes.io/tls"
