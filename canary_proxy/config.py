"""Config parsing: a flat mapping of string keys -> one frozen ``Config``. Pure, no I/O.

The keys follow ingress-nginx's canary annotations so its users can bring their
settings over unchanged, and the shape (a flat string mapping) is a ConfigMap's
``data``, so a file and a ConfigMap are one format.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

# The sticky bucket space: a split is precise to 1/BUCKETS (0.01 %).
BUCKETS = 10_000

_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")  # RFC 9110 token: header/cookie names
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
MAX_DURATION = 366 * 86400.0  # seconds; beyond a year is a typo, and floats stay exact in ms
_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})


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


@dataclass(frozen=True, slots=True)
class Config:
    """The effective configuration. Built once per (re)load, never mutated, swapped whole."""

    stable: Upstream
    canary: Upstream
    canary_weight: float = 0.0
    canary_weight_total: int = 100
    canary_by_header: str | None = None
    canary_by_header_value: str | None = None
    canary_by_header_pattern: str | None = None
    canary_by_cookie: str | None = None
    sticky_cookie: str = "canary_proxy_bucket"
    sticky_max_age: int = 86400
    upstream_connect_timeout: float = 2.0
    upstream_timeout: float = 60.0
    canary_failover: bool = True
    canary_outlier_failures: int = 0  # connect failures within 10 s that eject the canary; 0 = off
    canary_outlier_cooldown: float = 30.0  # how long an ejected canary gets no weighted traffic
    version_header: str = "X-Canary-Version"
    upstream_ca: str | None = None  # CA bundle for https upstreams, instead of the system's
    canary_mirror_percent: float = 0.0  # share of weight-routed stable requests copied to the canary
    canary_mirror_max_body: int = 64 << 10  # bodies above this are not mirrored (they are buffered)
    canary_mirror_timeout: float = 10.0  # a mirror copy gets no more than this, connect included
    canary_mirror_max_in_flight: int = 100  # mirror copies in progress at once, per process
    # Derived once here so the request path does no arithmetic or regex compilation.
    canary_buckets: int = field(default=0, compare=False)
    mirror_buckets: int = field(default=0, compare=False)
    header_regex: re.Pattern[str] | None = field(default=None, compare=False, repr=False)

    @property
    def weight_ratio(self) -> float:
        return self.canary_weight / self.canary_weight_total

    def effective(self) -> dict[str, Any]:
        """The flat mapping ``check`` prints and ``/config`` serves; it parses back to ``self``."""
        return {
            "stable-url": self.stable.url,
            "canary-url": self.canary.url,
            "canary-weight": _number_out(self.canary_weight),
            "canary-weight-total": self.canary_weight_total,
            "canary-by-header": self.canary_by_header,
            "canary-by-header-value": self.canary_by_header_value,
            "canary-by-header-pattern": self.canary_by_header_pattern,
            "canary-by-cookie": self.canary_by_cookie,
            "sticky-cookie": self.sticky_cookie,
            "sticky-max-age": self.sticky_max_age,
            "upstream-connect-timeout": format_duration(self.upstream_connect_timeout),
            "upstream-timeout": format_duration(self.upstream_timeout),
            "canary-failover": self.canary_failover,
            "canary-outlier-failures": self.canary_outlier_failures,
            "canary-outlier-cooldown": format_duration(self.canary_outlier_cooldown),
            "version-header": self.version_header,
            "upstream-ca": self.upstream_ca,
            "canary-mirror-percent": _number_out(self.canary_mirror_percent),
            "canary-mirror-max-body": format_size(self.canary_mirror_max_body),
            "canary-mirror-timeout": format_duration(self.canary_mirror_timeout),
            "canary-mirror-max-in-flight": self.canary_mirror_max_in_flight,
        }


def canary_buckets(weight: float, total: int) -> int:
    """Buckets (of BUCKETS) that go to the canary: round half up, so 0.005 % -> 1 bucket."""
    return min(BUCKETS, max(0, math.floor(weight / total * BUCKETS + 0.5)))


def _number_out(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def format_duration(seconds: float) -> str:
    """Whole milliseconds, which is what ``parse_duration`` keeps: the two round-trip exactly."""
    ms = round(seconds * 1000)
    if ms % 60_000 == 0 and ms >= 60_000:
        return f"{ms // 60_000}m"
    if ms % 1000 == 0:
        return f"{ms // 1000}s"
    return f"{ms}ms"


def parse_duration(value: Any, *, allow_zero: bool = False) -> float:
    """``500ms``, ``2s``, ``1m``, ``1h``; a plain number means seconds. Raises ValueError.

    Kept to whole milliseconds (a positive value below 0.5 ms is too small), so that
    ``format_duration`` prints it back exactly; at most MAX_DURATION.
    """
    if isinstance(value, bool):
        raise ValueError("a duration such as 500ms, 2s or 1m")
    try:
        if isinstance(value, int | float):
            ms = float(value) * 1000
        else:
            m = _DURATION.match(str(value))
            if not m:
                raise ValueError("a duration such as 500ms, 2s or 1m")
            ms = float(m.group(1)) * _DURATION_UNITS[m.group(2)] * 1000
    except OverflowError:  # an int too large for a float
        ms = math.inf
    if math.isnan(ms):
        raise ValueError("a duration such as 500ms, 2s or 1m")
    if ms > MAX_DURATION * 1000:
        raise ValueError("a duration of at most 366 days")
    whole = round(max(ms, -1.0))  # -inf cannot be rounded
    if whole < 0 or (whole == 0 and not (allow_zero and ms == 0)):
        raise ValueError("a duration greater than 0 (at least 1ms), such as 500ms, 2s or 1m")
    return whole / 1000


_SIZE = re.compile(r"^\s*(\d+)\s*(KiB|MiB|GiB)?\s*$")
_SIZE_UNITS = {None: 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}


def parse_size(value: Any) -> int:
    """``8KiB``, ``1MiB``, ``2GiB`` or plain bytes. Raises ValueError."""
    if isinstance(value, bool):
        raise ValueError("a size such as 8KiB, 1MiB or a number of bytes")
    m = _SIZE.match(str(value))
    if not m:
        raise ValueError("a size such as 8KiB, 1MiB or a number of bytes")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2)]


def format_size(size: int) -> str:
    for unit in ("GiB", "MiB", "KiB"):
        if size and size % _SIZE_UNITS[unit] == 0:
            return f"{size // _SIZE_UNITS[unit]}{unit}"
    return str(size)


def parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError("true or false")


def _parse_number(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("a number")
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an int too large for a float
        raise ValueError("a number") from None
    if not math.isfinite(number):
        raise ValueError("a finite number")
    return number


def _parse_percent(value: Any) -> float:
    number = _parse_number(value)
    if not 0 <= number <= 100:
        raise ValueError("a percentage from 0 to 100")
    return number


def _parse_whole(value: Any, *, minimum: int) -> int:
    number = _parse_number(value)
    if not number.is_integer() or number < minimum:
        raise ValueError(f"a whole number >= {minimum}")
    return int(number)


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


def _optional_token(value: Any, *, allow_empty: bool) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str | int) or isinstance(value, bool):
        raise ValueError("a header or cookie name")
    text = str(value).strip()
    if text == "":
        if allow_empty:
            return ""
        return None
    if not _TOKEN.match(text):
        raise ValueError("a header or cookie name made of letters, digits and -_.!#$%&'*+^`|~")
    return text


def _optional_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    try:
        return str(value)
    except ValueError:  # an int beyond Python's 4300-digit str() limit
        raise ValueError("a text value") from None


def _optional_path(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError("a file path")
    text = value.strip()
    if "\0" in text:
        raise ValueError("a file path without NUL characters")
    return text or None


def _compile(pattern: str) -> re.Pattern[str]:
    # A user's pattern such as "[[]" compiles, with a FutureWarning about a semantics change
    # in some later Python: the pattern is theirs to fix, our logs are no place for it.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return re.compile(pattern)


def _regex(value: Any) -> str | None:
    text = _optional_text(value)
    if text is None or text == "":
        return None
    try:
        _compile(text)
    except (re.error, OverflowError, RecursionError) as exc:  # a{4294967296}; 1000 nested groups
        raise ValueError(f"a valid regular expression ({exc})") from None
    return text


_PARSERS: dict[str, Callable[[Any], Any]] = {
    "stable-url": parse_upstream,
    "canary-url": parse_upstream,
    "canary-weight": _parse_number,
    "canary-weight-total": lambda v: _parse_whole(v, minimum=1),
    "canary-by-header": lambda v: _optional_token(v, allow_empty=False),
    "canary-by-header-value": _optional_text,
    "canary-by-header-pattern": _regex,
    "canary-by-cookie": lambda v: _optional_token(v, allow_empty=False),
    "sticky-cookie": lambda v: _optional_token(v, allow_empty=True) or "",
    "sticky-max-age": lambda v: _parse_whole(v, minimum=0),
    "upstream-connect-timeout": parse_duration,
    "upstream-timeout": parse_duration,
    "canary-failover": parse_bool,
    "canary-outlier-failures": lambda v: _parse_whole(v, minimum=0),
    "canary-outlier-cooldown": parse_duration,
    "version-header": lambda v: _optional_token(v, allow_empty=True) or "",
    "upstream-ca": _optional_path,
    "canary-mirror-percent": _parse_percent,
    "canary-mirror-max-body": parse_size,
    "canary-mirror-timeout": parse_duration,
    "canary-mirror-max-in-flight": lambda v: _parse_whole(v, minimum=1),
}

KEYS: tuple[str, ...] = tuple(_PARSERS)
REQUIRED = ("stable-url", "canary-url")


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
    errors: list[str] = []
    values: dict[str, Any] = {}
    for key in sorted(set(raw) - set(_PARSERS), key=str):
        errors.append(f"{key}: unknown key; expected one of {', '.join(KEYS)}")
    for key in REQUIRED:
        if raw.get(key) in (None, ""):
            errors.append(f"{key}: required; expected a URL such as http://host:port")
    for key, parser in _PARSERS.items():
        if key not in raw or (key in REQUIRED and raw[key] in (None, "")):
            continue
        try:
            values[key] = parser(raw[key])
        except ValueError as exc:
            errors.append(f"{key}: invalid value {_describe(raw[key])}; expected {exc}")
    total = values.get("canary-weight-total", 100)
    weight = values.get("canary-weight", 0.0)
    if "canary-weight" in values and not 0 <= weight <= total:
        errors.append(
            f"canary-weight: invalid value {_describe(raw['canary-weight'])}; "
            f"expected a number from 0 to {total} (canary-weight-total)"
        )
    if errors:
        raise ConfigError(errors)
    return _build(values)


def _build(values: dict[str, Any]) -> Config:
    weight = float(values.get("canary-weight", 0.0))
    total = int(values.get("canary-weight-total", 100))
    pattern = values.get("canary-by-header-pattern")
    kwargs = {k.replace("-", "_"): v for k, v in values.items() if k not in ("stable-url", "canary-url")}
    kwargs.update(canary_weight=weight, canary_weight_total=total)
    mirror = float(values.get("canary-mirror-percent", 0.0))
    return Config(
        stable=values["stable-url"],
        canary=values["canary-url"],
        canary_buckets=canary_buckets(weight, total),
        mirror_buckets=canary_buckets(mirror, 100),
        header_regex=_compile(pattern) if pattern else None,
        **kwargs,
    )
