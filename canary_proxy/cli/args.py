"""Flags shared by every command: values read from ``CANARY_PROXY_<FLAG>``, and the argument
types, each with the placeholder ``--help`` shows for it (DURATION, SIZE, HOST:PORT, ...)."""

from __future__ import annotations

import argparse
import ipaddress
import os
from collections.abc import Callable
from typing import Any

from ..address import Address, parse_address
from ..values import parse_duration, parse_size

KUBECONFIG_HELP = "kubeconfig path (default: in-cluster, $KUBECONFIG, ~/.kube/config)"


def env_name(flag: str) -> str:
    return "CANARY_PROXY_" + flag.lstrip("-").upper().replace("-", "_")


def env_flag(
    parser: Any,
    flag: str,
    *,
    default: str | None = None,
    help: str = "",
    shown: str | None = None,
    **kwargs: Any,
) -> None:
    """A flag whose default comes from its environment variable; the command line wins.

    Its placeholder comes from its type (``METAVARS``) unless ``metavar`` is given. ``shown``
    says what the help names as the default of a flag whose default is worked out later."""
    env = env_name(flag)
    shown = (shown or default or "none").replace("%", "%%")  # argparse %-formats help
    if "metavar" not in kwargs and kwargs.get("type") in METAVARS:
        kwargs["metavar"] = METAVARS[kwargs["type"]]
    parser.add_argument(
        flag, default=os.environ.get(env, default), help=f"{help} [env {env}; default: {shown}]", **kwargs
    )


def typed(parse: Callable[[str], Any], expected: str | None = None) -> Callable[[str], Any]:
    """An argparse type from a parser that raises ValueError("what was expected")."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{text!r}: expected {expected or exc}") from None

    convert.__name__ = parse.__name__.lstrip("_")  # argparse names the type in its errors
    return convert


duration = typed(lambda text: parse_duration(text, allow_zero=True))
size = typed(parse_size)
address: Callable[[str], Address] = typed(parse_address)


def _count(text: str) -> int:
    if not str(text).isdigit() or int(text) < 1:
        raise ValueError("a positive whole number")
    return int(text)


def _whole(text: str) -> int:
    if not str(text).isdigit():
        raise ValueError("a whole number of at least 0")
    return int(text)


def _workers(text: str) -> int:
    if str(text) == "auto":
        return len(os.sched_getaffinity(0))
    if not str(text).isdigit() or int(text) < 1:
        raise ValueError("a positive whole number or 'auto'")
    return int(text)


def _cidrs(text: str) -> tuple[str, ...]:
    cidrs = tuple(part.strip() for part in str(text).split(",") if part.strip())
    for cidr in cidrs:
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{cidr!r}: expected a CIDR such as 10.0.0.0/8") from None
    return cidrs


def _on_off(text: str) -> bool:
    if text not in ("on", "off"):
        raise ValueError("on or off")
    return text == "on"


count = typed(_count)
whole = typed(_whole)
workers = typed(_workers)
cidrs = _cidrs
on_off = typed(_on_off)

METAVARS: dict[Any, str] = {
    duration: "DURATION",
    size: "SIZE",
    address: "HOST:PORT",
    count: "N",
    whole: "N",
    workers: "N|auto",
    cidrs: "CIDR,...",
    on_off: "on|off",
}


def logging_flags(parser: Any) -> None:
    env_flag(parser, "--log-format", default="json", choices=("json", "text"), help="stderr log format")
    env_flag(
        parser, "--log-level", default="info", choices=("debug", "info", "warning", "error"), help="log level"
    )
