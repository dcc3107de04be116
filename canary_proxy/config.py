"""Config parsing: a flat mapping of string keys -> one frozen ``Config``. Pure, no I/O.

The keys follow ingress-nginx's canary annotations so its users can bring their
settings over unchanged, and the shape (a flat string mapping) is a ConfigMap's
``data``, so a file and a ConfigMap are one format.

Each key is declared once, as a field of ``Config``: its type, default, parser, how
``check`` prints it, and its line in docs/configuration.md. The parser table, the
effective config and the reference table in the docs are all derived from those fields.
The value parsers a declaration names (durations, sizes, names...) live in ``values``.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from functools import partial
from typing import Any
from urllib.parse import urlsplit

from .values import (
    compile_regex,
    format_number,
    format_size,
    parse_bool,
    parse_duration,
    parse_name,
    parse_name_or_off,
    parse_number,
    parse_path,
    parse_percent,
    parse_regex,
    parse_size,
    parse_text,
    parse_whole,
)

# proxy/server.py imports format_duration from here: the alias re-exports it until that
# import names .values instead.
from .values import format_duration as format_duration

# The sticky bucket space: a split is precise to 1/BUCKETS (0.01 %).
BUCKETS = 10_000


class ConfigError(ValueError):
    """One or more invalid keys. ``errors`` holds one human-readable line per problem."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("; ".join(errors))
        self.errors = errors


@dataclass(frozen=True, slots=True)
class Upstream:
    """A parsed ``http(s)://host:port`` base URL."""

    url: str  # normalised, no trailing slash
    scheme: str
    host: str
    port: int

    @property
    def tls(self) -> bool:
        return self.scheme == "https"


def canary_buckets(weight: float, total: int) -> int:
    """Buckets (of BUCKETS) that go to the canary: round half up, so 0.005 % -> 1 bucket."""
    return min(BUCKETS, max(0, math.floor(weight / total * BUCKETS + 0.5)))


def parse_upstream(value: Any) -> Upstream:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("a URL such as http://host:port")
    text = value.strip().rstrip("/")
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"a URL such as http://host:port ({exc})") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError("a URL with scheme http or https, such as http://host:port")
    if not parts.hostname:
        raise ValueError("a URL with a host, such as http://host:port")
    if parts.path or parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError("a bare http(s)://host:port, without path, query or credentials")
    if port is None:
        port = 443 if parts.scheme == "https" else 80
    return Upstream(url=text, scheme=parts.scheme, host=parts.hostname, port=port)


def _same(value: Any) -> Any:
    return value


def _upstream_url(upstream: Upstream) -> str:
    return upstream.url


@dataclass(frozen=True, slots=True)
class Key:
    """One config key, as its ``Config`` field declares it."""

    name: str  # as written in a config file: "canary-weight"
    attribute: str  # the Config attribute: "canary_weight"
    default: Any  # the attribute's default; MISSING for a required key
    parse: Callable[[Any], Any]  # raw value -> attribute value; raises ValueError saying what was expected
    show: Callable[[Any], Any]  # attribute value -> its effective form, which parses back to it
    doc: str  # one line, the "meaning" column of the key table in docs/configuration.md

    @property
    def required(self) -> bool:
        return self.default is MISSING


_KEY = "canary_proxy.key"  # where a field's metadata holds its Key


def key(
    parse: Callable[[Any], Any], doc: str, *, show: Callable[[Any], Any] = _same, name: str = ""
) -> dict[str, Key]:
    """The field metadata that makes a ``Config`` attribute a config key.

    The key is named after the attribute, ``-`` for ``_``, unless ``name`` says otherwise.
    Name, attribute and default are filled in from the field itself (see ``DECLARATIONS``).
    """
    return {_KEY: Key(name=name, attribute="", default=MISSING, parse=parse, show=show, doc=doc)}


@dataclass(frozen=True, slots=True)
class Config:
    """The effective configuration. Built once per (re)load, never mutated, swapped whole.

    Every field with ``key`` metadata is a config key, in the order ``check`` prints them and
    the docs list them; the fields after them are derived by ``parse_config``.
    """

    stable: Upstream = field(
        metadata=key(
            parse_upstream,
            "`http(s)://host:port` of the stable Service",
            show=_upstream_url,
            name="stable-url",
        )
    )
    canary: Upstream = field(
        metadata=key(
            parse_upstream,
            "`http(s)://host:port` of the canary Service",
            show=_upstream_url,
            name="canary-url",
        )
    )
    canary_weight: float = field(
        default=0.0,
        metadata=key(
            parse_number, "canary share, 0 to `canary-weight-total`; decimals allowed", show=format_number
        ),
    )
    canary_weight_total: int = field(
        default=100,
        metadata=key(partial(parse_whole, minimum=1), "what the weight is out of; a positive whole number"),
    )
    canary_by_header: str | None = field(
        default=None,
        metadata=key(
            parse_name,
            "header name: `always` → canary, `never` → stable, other values fall through",
        ),
    )
    canary_by_header_value: str | None = field(
        default=None,
        metadata=key(parse_text, "with `canary-by-header`: this exact value → canary; others fall through"),
    )
    canary_by_header_pattern: str | None = field(
        default=None,
        metadata=key(parse_regex, "with `canary-by-header`: a regex; a full match → canary"),
    )
    canary_by_cookie: str | None = field(
        default=None,
        metadata=key(parse_name, "cookie name: `always` → canary, `never` → stable"),
    )
    sticky_cookie: str = field(
        default="canary_proxy_bucket",
        metadata=key(
            parse_name_or_off,
            'the cookie that keeps a user on their version; `""` turns stickiness off',
        ),
    )
    sticky_max_age: int = field(default=86400, metadata=key(partial(parse_whole, minimum=0), "seconds"))
    upstream_connect_timeout: float = field(
        default=2.0,
        metadata=key(parse_duration, "`500ms`, `2s`, `1m` (a plain number is seconds)", show=format_duration),
    )
    upstream_timeout: float = field(
        default=60.0,
        metadata=key(
            parse_duration,
            "longest wait for the upstream's response headers, and between two reads of its body",
            show=format_duration,
        ),
    )
    canary_failover: bool = field(
        default=True,
        metadata=key(parse_bool, "a canary that cannot be connected to is retried on stable"),
    )
    canary_outlier_failures: int = field(
        default=0,
        metadata=key(
            partial(parse_whole, minimum=0),
            "this many canary connect failures within 10 s eject the canary for the cool-down "
            "(see [Outlier protection](routing.md#outlier-protection)); `0` turns it off",
        ),
    )
    canary_outlier_cooldown: float = field(
        default=30.0,
        metadata=key(
            parse_duration, "how long an ejected canary gets no weighted traffic", show=format_duration
        ),
    )
    version_header: str = field(
        default="X-Canary-Version",
        metadata=key(
            parse_name_or_off,
            "response header naming the version that served (or, on our own 502/504, was tried); "
            '`""` turns it off',
        ),
    )
    upstream_ca: str | None = field(
        default=None,
        metadata=key(
            parse_path,
            "path to a PEM (or DER) CA bundle that `https://` upstreams are verified against, "
            "instead of the system's CAs",
        ),
    )
    canary_mirror_percent: float = field(
        default=0.0,
        metadata=key(
            parse_percent,
            "share (0 to 100, decimals allowed) of the requests the weight sends to stable that are "
            "also copied to the canary (see [Traffic mirroring](mirroring.md))",
            show=format_number,
        ),
    )
    canary_mirror_max_body: int = field(
        default=64 << 10,  # larger bodies are not mirrored because mirroring buffers them
        metadata=key(
            parse_size,
            "requests with a larger body are not mirrored; `8KiB`, `1MiB` or bytes",
            show=format_size,
        ),
    )
    canary_mirror_timeout: float = field(
        default=10.0,
        metadata=key(
            parse_duration,
            "a mirror copy's whole exchange (connect included) gets no longer than this",
            show=format_duration,
        ),
    )
    canary_mirror_max_in_flight: int = field(
        default=100,
        metadata=key(
            partial(parse_whole, minimum=1),
            "mirror copies in progress at once, per process; beyond it copies are skipped",
        ),
    )
    # Derived once by parse_config so the request path does no arithmetic or regex compilation.
    canary_buckets: int = field(default=0, compare=False)
    mirror_buckets: int = field(default=0, compare=False)
    header_regex: re.Pattern[str] | None = field(default=None, compare=False, repr=False)

    @property
    def weight_ratio(self) -> float:
        return self.canary_weight / self.canary_weight_total

    def effective(self) -> dict[str, Any]:
        """The flat mapping ``check`` prints and ``/config`` serves; it parses back to ``self``."""
        return {k.name: k.show(getattr(self, k.attribute)) for k in DECLARATIONS}


def _declared() -> tuple[Key, ...]:
    keys = []
    for f in fields(Config):
        if _KEY in f.metadata:
            spec: Key = f.metadata[_KEY]
            name = spec.name or f.name.replace("_", "-")
            keys.append(replace(spec, name=name, attribute=f.name, default=f.default))
    return tuple(keys)


# Every key, in declaration order: the one table parsing, ``effective`` and the docs read.
DECLARATIONS: tuple[Key, ...] = _declared()
KEYS: tuple[str, ...] = tuple(k.name for k in DECLARATIONS)
REQUIRED: tuple[str, ...] = tuple(k.name for k in DECLARATIONS if k.required)
DEFAULTS: dict[str, Any] = {k.attribute: k.default for k in DECLARATIONS if not k.required}


def reference_table() -> str:
    """The key table of docs/configuration.md, in Markdown (tests/test_docs.py compares them)."""
    rows = ["| key | meaning | default |", "|---|---|---|"]
    rows += [f"| `{k.name}` | {k.doc} | {_documented_default(k)} |" for k in DECLARATIONS]
    return "\n".join(rows)


def _documented_default(k: Key) -> str:
    if k.required:
        return "required"
    if k.default is None:
        return "none"
    shown = k.show(k.default)
    return f"`{str(shown).lower() if isinstance(shown, bool) else shown}`"


def _describe(value: Any) -> str:
    try:
        text = repr(value)
    except ValueError:  # an int beyond Python's 4300-digit str() limit
        return "(a number too large to show)"
    return text if len(text) <= 80 else text[:77] + "..."


def parse_config(raw: Mapping[str, Any]) -> Config:
    """Validate every key of ``raw`` and build a Config, or raise ConfigError listing all errors."""
    if not isinstance(raw, Mapping):
        raise ConfigError(["the config must be a mapping of keys to values"])
    errors = [_unknown(k) for k in sorted(set(raw) - set(KEYS), key=str)]
    values: dict[str, Any] = {}
    for k in DECLARATIONS:
        if k.required and raw.get(k.name) in (None, ""):
            errors.append(f"{k.name}: required; expected {_expected(k)}")
        elif k.name in raw:
            try:
                values[k.attribute] = k.parse(raw[k.name])
            except ValueError as exc:
                errors.append(f"{k.name}: invalid value {_describe(raw[k.name])}; expected {exc}")
    total = values.get("canary_weight_total", DEFAULTS["canary_weight_total"])
    weight = values.get("canary_weight", DEFAULTS["canary_weight"])
    if "canary_weight" in values and not 0 <= weight <= total:
        errors.append(
            f"canary-weight: invalid value {_describe(raw['canary-weight'])}; "
            f"expected a number from 0 to {total} (canary-weight-total)"
        )
    if errors:
        raise ConfigError(errors)
    return _build(values)


def _unknown(name: Any) -> str:
    """A mistyped key names the key it is closest to; anything else lists them all."""
    close = difflib.get_close_matches(str(name), KEYS, n=1)
    if close:
        return f"{name}: unknown key; did you mean {close[0]}?"
    return f"{name}: unknown key; expected one of {', '.join(KEYS)}"


def _expected(k: Key) -> str:
    """What a required key expects, in its parser's own words."""
    try:
        k.parse(None)
    except ValueError as exc:
        return str(exc)
    return "a value"


def _build(values: dict[str, Any]) -> Config:
    """``values``: parsed keys by attribute; the rest keep their defaults."""
    config = Config(**values)
    pattern = config.canary_by_header_pattern
    return replace(
        config,
        canary_buckets=canary_buckets(config.canary_weight, config.canary_weight_total),
        mirror_buckets=canary_buckets(config.canary_mirror_percent, 100),
        header_regex=compile_regex(pattern) if pattern else None,
    )
