"""``demo``: a whole canary rollout on loopback (the demo itself is the ``demo`` package)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from ..runner import Exit, run_async


def add_commands(sub: Any) -> None:
    demo = sub.add_parser(
        "demo",
        help="a canary rollout on loopback: two demo apps, the proxy, traffic, analysis, live view",
        description="Exit codes: 0 promoted (every rollout, with --services 2), 1 rolled back (any), "
        "2 cannot start, 130 Ctrl-C.",
    )
    demo.add_argument(
        "--bad-canary",
        choices=("errors", "latency"),
        help="make v2 fail (default: healthy); with --services 2, the first service's v2 only",
    )
    demo.add_argument(
        "--fail-at", type=_number(0, 100), default=20.0, metavar="PERCENT", help="v2 fails from this %% on"
    )
    demo.add_argument(
        "--speed", type=_number(0, 10), default=1.0, metavar="FACTOR", help="2: twice as fast; at most 10"
    )
    demo.add_argument(
        "--services",
        type=int,
        choices=(1, 2),
        default=1,
        help="2: two services (shop, blog) behind the one proxy, by Host, each with its own rollout",
    )
    demo.add_argument(
        "--port", type=_port, default=0, metavar="PORT", help="proxy port on 127.0.0.1 (0: a free one)"
    )
    demo.add_argument(
        "--admin-port", type=_port, default=0, metavar="PORT", help="admin port (0: a free one)"
    )


def _number(low: float, high: float) -> Callable[[str], float]:
    def number(text: str) -> float:
        try:
            value = float(text.removesuffix("%"))
        except ValueError:
            value = float("nan")
        if not low < value <= high:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a number above {low:g}, at most {high:g}")
        return value

    return number


def _port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a port, 0 to 65535")
    return int(text)


def cmd_demo(args: argparse.Namespace) -> int:
    from ..demo.model import DemoOptions
    from ..demo.run import run_demo

    options = DemoOptions(
        bad_canary=args.bad_canary,
        fail_at=args.fail_at,
        speed=args.speed,
        port=args.port,
        admin_port=args.admin_port,
        services=args.services,
    )
    try:
        return run_async(run_demo(options))
    except KeyboardInterrupt:
        return Exit.INTERRUPTED


HANDLERS = {"demo": cmd_demo}
