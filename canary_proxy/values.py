"""Config values: each parser takes a raw value and returns it typed, or raises ValueError
saying what was expected; each formatter prints a value back so that it parses to the same.

Shared by the config keys (``config.Config`` declares which key uses which), the command
line's flags and a rollout's plan. Pure, no I/O.
"""

from __future__ import annotations

import math
import re
import warnings
from typing import Any

_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")  # RFC 9110 token: header/cookie names
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
MAX_DURATION = 366 * 86400.0  # seconds; beyond a year is a typo, and floats stay exact in ms
_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})


def format_number(value: float) -> int | float:
    """A whole number prints without ``.0``: ``2.0`` -> ``2``, ``2.5`` stays."""
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


def parse_number(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("a number")
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an int too large for a float
        raise ValueError("a number") from None
    if not math.isfinite(number):
        raise ValueError("a finite number")
    return number


def parse_percent(value: Any) -> float:
    number = parse_number(value)
    if not 0 <= number <= 100:
        raise ValueError("a percentage from 0 to 100")
    return number


def parse_whole(value: Any, *, minimum: int) -> int:
    number = parse_number(value)
    if not number.is_integer() or number < minimum:
        raise ValueError(f"a whole number >= {minimum}")
    return int(number)


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


def parse_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    try:
        return str(value)
    except ValueError:  # an int beyond Python's 4300-digit str() limit
        raise ValueError("a text value") from None


def parse_path(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError("a file path")
    text = value.strip()
    if "\0" in text:
        raise ValueError("a file path without NUL characters")
    return text or None


def compile_regex(pattern: str) -> re.Pattern[str]:
    # A user's pattern such as "[[]" compiles, with a FutureWarning about a semantics change
    # in some later Python: the pattern is theirs to fix, our logs are no place for it.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return re.compile(pattern)


def parse_regex(value: Any) -> str | None:
    text = parse_text(value)
    if text is None or text == "":
        return None
    try:
        compile_regex(text)
    except (re.error, OverflowError, RecursionError) as exc:  # a{4294967296}; 1000 nested groups
        raise ValueError(f"a valid regular expression ({exc})") from None
    return text


def parse_name(value: Any) -> str | None:
    return _optional_token(value, allow_empty=False)


def parse_name_or_off(value: Any) -> str:
    """A header or cookie name; ``""`` turns the feature off."""
    return _optional_token(value, allow_empty=True) or ""
