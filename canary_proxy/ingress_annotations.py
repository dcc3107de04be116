"""The ingress-nginx annotations of an Ingress: which ones are carried, which are ignored and why. Pure.

``ingress`` reads a main Ingress's annotations with ``NginxAnnotations.main`` and a canary
Ingress's with ``NginxAnnotations.canary`` (rule 5 of its docstring): the canary rules are
carried on a canary Ingress, the timeouts and ``proxy-body-size`` on the main one, and every
other annotation is listed once with the reason it has no effect.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from .config import DECLARATIONS

DEFAULT_PREFIX: Final = "nginx.ingress.kubernetes.io"

# ingress-nginx canary annotation -> config key (the names are the same on purpose).
CANARY_KEYS: Final = (
    "canary-weight",
    "canary-weight-total",
    "canary-by-header",
    "canary-by-header-value",
    "canary-by-header-pattern",
    "canary-by-cookie",
)
# Read from the main Ingress: annotation -> config key.
TIMEOUT_KEYS: Final = {
    "proxy-read-timeout": "upstream-timeout",
    "proxy-connect-timeout": "upstream-connect-timeout",
}
BODY_SIZE: Final = "proxy-body-size"
SNIPPETS: Final = frozenset({"configuration-snippet", "server-snippet"})

_SNIPPET_REASON = (
    "never executed: a snippet is raw nginx configuration, and running it would be a security hole"
)
_REASONS: Final = {
    "affinity": "canary-proxy keeps users sticky with its own bucket cookie (sticky-cookie)",
    "session-cookie-name": "canary-proxy keeps users sticky with its own bucket cookie (sticky-cookie)",
    "session-cookie-max-age": "the sticky bucket cookie lasts sticky-max-age",
    "session-cookie-expires": "the sticky bucket cookie lasts sticky-max-age",
    "ssl-redirect": "canary-proxy does not redirect to HTTPS yet",
    "force-ssl-redirect": "canary-proxy does not redirect to HTTPS yet",
    "backend-protocol": "Service backends are reached over plain HTTP",
    "rewrite-target": "canary-proxy forwards the path unchanged",
    "use-regex": "paths are matched as Prefix or Exact, never as regular expressions",
    "proxy-send-timeout": "canary-proxy bounds the upstream's reads (upstream-timeout), not its writes",
    "load-balance": "kube-proxy balances across the Service's pods (the backend is its cluster IP)",
    "upstream-hash-by": "kube-proxy balances across the Service's pods (the backend is its cluster IP)",
    "session-cookie-path": "the sticky bucket cookie always has Path=/",
    "mirror-target": (
        "ingress-nginx mirrors to any URL; canary-proxy mirrors only to the canary: set "
        "canary-mirror-percent (and canary-mirror-max-body) if that is what it was for"
    ),
    "mirror-request-body": "canary-proxy mirrors bodies up to canary-mirror-max-body (default 64KiB)",
    "mirror-host": "a mirror copy keeps the request's Host and adds X-Canary-Mirror: 1",
    "canary-by-header-value-pattern": (
        "not an ingress-nginx annotation; did you mean canary-by-header-pattern?"
    ),
}
_DEFAULT_REASON = "not supported by canary-proxy"
_ON_MAIN_ONLY = "only a canary Ingress's canary rules apply"
INHERITED: Final = "on a canary Ingress it is inherited from the main Ingress, as in ingress-nginx"

_PARSE_BOOL_TRUE: Final = frozenset({"1", "t", "true"})  # Go's strconv.ParseBool, lower-cased
_SIZE = re.compile(r"^\s*(\d+)\s*([kKmMgG]?)\s*$")
_SIZE_UNITS: Final = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
_KEYS: Final = {k.name: k for k in DECLARATIONS}


@dataclass
class Reading:
    """What one Ingress's annotations come to. Annotation names here carry the prefix."""

    carried: dict[str, str] = field(default_factory=dict)  # config key -> value
    body_limit: int | None = None  # proxy-body-size in bytes; 0 = unlimited; None = not set
    invalid: list[str] = field(default_factory=list)  # one message per carried one not applied
    ignored: list[tuple[str, str]] = field(default_factory=list)  # (annotation, reason)


@dataclass(frozen=True, slots=True)
class NginxAnnotations:
    """The annotations under one prefix (``nginx.ingress.kubernetes.io/`` unless configured)."""

    prefix: str  # ends with "/"

    @classmethod
    def under(cls, prefix: str = DEFAULT_PREFIX) -> NginxAnnotations:
        return cls(prefix.rstrip("/") + "/")

    def of(self, annotations: Mapping[Any, Any]) -> dict[str, str]:
        """The annotations under the prefix, by their name after it."""
        found = annotations.items()
        return {str(k)[len(self.prefix) :]: str(v) for k, v in found if str(k).startswith(self.prefix)}

    def is_canary(self, annotations: Mapping[Any, Any]) -> bool:
        """``<prefix>/canary`` is true, as Go's strconv.ParseBool reads it."""
        return str(annotations.get(self.prefix + "canary")).strip().lower() in _PARSE_BOOL_TRUE

    def main(self, annotations: Mapping[str, str]) -> Reading:
        """A main Ingress's annotations (from ``of``): its timeouts and body size are carried."""
        reading = Reading()
        for annotation, value in sorted(annotations.items()):
            if annotation == "canary":  # "false": Flagger's switched-off canary, a main Ingress
                continue
            if annotation in TIMEOUT_KEYS:
                try:
                    _KEYS[TIMEOUT_KEYS[annotation]].parse(value)
                except ValueError as exc:
                    reading.invalid.append(f"{self.prefix}{annotation}: {value!r} is not {exc}; not applied")
                else:
                    reading.carried[TIMEOUT_KEYS[annotation]] = value
            elif annotation == BODY_SIZE:
                try:
                    reading.body_limit = parse_nginx_size(value)
                except ValueError as exc:
                    reading.invalid.append(f"{self.prefix}{BODY_SIZE}: {exc}; not applied")
            elif annotation in CANARY_KEYS:
                reading.ignored.append((self.prefix + annotation, _ON_MAIN_ONLY))
            else:
                reading.ignored.append((self.prefix + annotation, reason(annotation)))
        return reading

    def canary(self, annotations: Mapping[str, str]) -> Reading:
        """A canary Ingress's annotations (from ``of``): its canary rules are carried; its
        timeouts and body size are the main's (see ``differing_inherited``)."""
        reading = Reading()
        for annotation, value in sorted(annotations.items()):
            if annotation == "canary":
                continue
            if annotation in CANARY_KEYS:
                reading.carried[annotation] = value
            elif annotation not in TIMEOUT_KEYS and annotation != BODY_SIZE:
                reading.ignored.append((self.prefix + annotation, reason(annotation)))
        return reading

    def differing_inherited(
        self, annotations: Mapping[str, str], *, main: Mapping[str, str], body_limit: int | None
    ) -> list[str]:
        """The canary's timeouts and body size that differ from its main's (Flagger copies
        them over): ``main`` is what the main Ingress carried, ``body_limit`` its body size."""
        differ = [
            self.prefix + annotation
            for annotation, key in TIMEOUT_KEYS.items()
            if annotation in annotations and annotations[annotation] != main.get(key)
        ]
        if BODY_SIZE in annotations:
            try:
                same = parse_nginx_size(annotations[BODY_SIZE]) == body_limit
            except ValueError:
                same = False
            if not same:
                differ.append(self.prefix + BODY_SIZE)
        return differ


def parse_nginx_size(value: str) -> int:
    """nginx's size syntax (``client_max_body_size``): ``512``, ``8k``, ``1m``, ``1g``;
    ``0`` means no limit. Raises ValueError."""
    m = _SIZE.match(value)
    if not m:
        raise ValueError(f"invalid size {value!r}; expected a size such as 8k, 1m or 1g")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]


def reason(annotation: str) -> str:
    """Why ``annotation`` (its name after the prefix) has no effect."""
    if annotation in SNIPPETS:
        return _SNIPPET_REASON
    return _REASONS.get(annotation, _DEFAULT_REASON)
