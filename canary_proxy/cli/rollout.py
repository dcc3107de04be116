"""``rollout``, ``promote``, ``abort`` and ``status``: flags, and handlers that return exit codes.

``cli.main`` adds these subcommands with ``add_commands`` and calls ``HANDLERS[command]``;
it stays the only place that exits. Exit codes of ``rollout``:
0 promoted, 1 rolled back or aborted (the canary's weight is then 0), 2 bad arguments
(or a recorded rollout that does not match them, or a ``--route`` the config contradicts),
3 the ConfigMap or file is missing or the API stays unreachable; 128 + N when stopped by
signal N (the state is kept to resume).
``promote``/``abort``: 0 requested, 1 no rollout to act on, 2 and 3 as above.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import secrets
import signal
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from ..config import ConfigError
from ..rollout.analysis import Thresholds, parse_factor, parse_percent
from ..rollout.controller import Controller
from ..rollout.decide import STOPPED, Settings
from ..rollout.plan import Plan, PlanError, mirrors, parse_plan
from ..rollout.report import format_status, status_report
from ..rollout.state import COMMAND, RUNNING, StateError, decode
from ..rollout.store import (
    Change,
    FileStore,
    Invalid,
    Missing,
    Store,
    Stored,
    StoreError,
    Unavailable,
    open_configmap_store,
)
from ..rollout.webhooks import Webhooks, parse_webhook
from ..router import DEFAULT_ROUTE
from ..routes import parse_route
from ..runner import Exit, fail, run_async, signalled
from .args import KUBECONFIG_HELP, METAVARS, duration, env_flag, typed, whole

log = logging.getLogger(__name__)

# -- argument types -----------------------------------------------------------------------------


def _plan(text: str) -> Plan:
    try:
        return parse_plan(text)
    except PlanError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(text: str) -> int:
    if not str(text).isdigit() or int(text) < 1:
        raise ValueError("a whole number of at least 1")
    return int(text)


def _mirror_share(text: str) -> float:
    try:
        value = float(str(text).removesuffix("%"))
    except ValueError:
        value = -1.0
    if not 0 < value <= 100:
        raise ValueError("a percentage greater than 0 and at most 100")
    return value


percent = typed(parse_percent)
factor = typed(parse_factor)
positive_int = typed(_positive_int)
mirror_share = typed(_mirror_share)
webhook = typed(parse_webhook)
PLACEHOLDERS = {
    **METAVARS,
    _plan: "STEP,...",
    percent: "PERCENT",
    factor: "FACTOR",
    positive_int: "N",
    mirror_share: "PERCENT",
}


# -- the subcommands ------------------------------------------------------------------------------


def add_commands(sub: Any) -> None:
    """Add rollout, promote, abort and status to the ``canary-proxy`` subparsers."""
    rollout = sub.add_parser(
        "rollout",
        help="raise the canary's weight step by step, checking it against stable; roll back on failure",
        description="Exit codes: 0 promoted, 1 rolled back or aborted (weight 0), 2 bad arguments, "
        "3 the ConfigMap or file is missing or the API stays unreachable.",
    )
    _target(rollout)
    _flag(
        rollout,
        "--steps",
        type=_plan,
        help="percentages of traffic, pause, pause:DURATION, mirror:DURATION (first); ends at 100",
    )
    _flag(
        rollout,
        "--mirror-percent",
        default="100",
        type=mirror_share,
        help="canary-mirror-percent during mirror steps (0 after them)",
    )
    _flag(
        rollout, "--step-duration", default="1m", type=duration, help="each weight step lasts at least this"
    )
    _flag(rollout, "--interval", default="15s", type=duration, help="one check (and decision) per interval")
    _flag(rollout, "--prometheus", metavar="URL", help="Prometheus base URL, queried over its HTTP API")
    rollout.add_argument(
        "--metrics-url",
        action="append",
        metavar="URL",
        default=[],
        help="a proxy's /metrics URL, scraped every interval; repeat for each replica",
    )
    _flag(
        rollout,
        "--route",
        metavar="NAME",
        shown="the config's name key, else 'default', the route of a config served alone",
        help="the route whose series the analysis reads; a ConfigMap that serve "
        "--configmap-selector loads is route NAMESPACE/NAME: give it",
    )
    _flag(
        rollout,
        "--window",
        type=duration,
        help="PromQL range of a check (--prometheus only; unset: the interval, at least 1m)",
    )
    _flag(rollout, "--max-error-rate", default="1%", type=percent, help="canary 5xx share limit")
    _flag(rollout, "--max-p99", default="500ms", type=duration, help="canary p99 latency limit")
    _flag(
        rollout,
        "--max-error-rate-increase",
        default="0.5",
        type=percent,
        help="percentage points above stable's error rate",
    )
    _flag(rollout, "--max-p99-increase", default="2x", type=factor, help="factor of stable's p99")
    _flag(
        rollout,
        "--min-requests",
        default="100",
        type=positive_int,
        help="fewer canary requests: inconclusive",
    )
    _flag(
        rollout,
        "--failure-threshold",
        default="2",
        type=positive_int,
        help="consecutive failed checks to roll back",
    )
    _flag(
        rollout,
        "--progress-deadline",
        default="10m",
        type=duration,
        help="no conclusive check for this long: roll back",
    )
    rollout.add_argument(
        "--webhook",
        action="append",
        default=[],
        type=webhook,
        metavar="KIND=URL",
        help="pre-rollout, pre-step, confirm-promotion, rollback or event; repeatable",
    )
    _flag(rollout, "--webhook-timeout", default="10s", type=duration, help="per webhook call")
    _flag(rollout, "--webhook-retries", default="2", type=whole, help="on no answer or a 5xx")
    rollout.add_argument("--gradual-abort", action="store_true", help="on failure, step back down the steps")
    rollout.add_argument("--restart", action="store_true", help="start over, whatever was recorded")
    _flag(rollout, "--log-format", default="json", choices=("json", "text"), help="stderr log format")
    _flag(rollout, "--log-level", default="info", choices=("debug", "info", "warning", "error"))

    promote = sub.add_parser(
        "promote", help="end the current pause or step now (--full: go to 100%% and finish)"
    )
    promote.add_argument("--full", action="store_true", help="jump to 100%% and finish the rollout")
    _target(promote)
    abort = sub.add_parser("abort", help="roll the running rollout back now (canary weight 0)")
    _target(abort)
    status = sub.add_parser("status", help="a rollout's phase, step, weight and last analysis")
    _target(status)
    status.add_argument("--output", "-o", default="text", choices=("text", "json"), help="output format")


def _flag(parser: Any, flag: str, **kwargs: Any) -> None:
    """``args.env_flag``, with the placeholders of the rollout's own types."""
    if kwargs.get("type") in PLACEHOLDERS:
        kwargs.setdefault("metavar", PLACEHOLDERS[kwargs["type"]])
    env_flag(parser, flag, **kwargs)


def _target(parser: Any) -> None:
    parser.add_argument("target", nargs="?", metavar="[NS/]NAME", help="the proxy's ConfigMap")
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="a local config file instead of a ConfigMap (state in FILE.rollout.json)",
    )
    _flag(parser, "--kubeconfig", metavar="FILE", help=KUBECONFIG_HELP)


def _errors(lines: list[str]) -> int:
    return fail(Exit.USAGE, lines)


def _target_errors(args: argparse.Namespace) -> list[str]:
    if bool(args.target) == bool(args.config):
        return ["exactly one of [NS/]NAME (a ConfigMap) and --config FILE is required"]
    return []


@contextlib.asynccontextmanager
async def open_store(args: argparse.Namespace) -> AsyncIterator[Store]:
    """The store named on the command line: ``--config FILE`` or ``[NS/]NAME``."""
    if args.config:
        yield FileStore(args.config)
        return
    async with open_configmap_store(args.target, kubeconfig=args.kubeconfig) as store:
        yield store


def _run(coro: Any) -> int:
    return run_async(coro)


# -- rollout ------------------------------------------------------------------------------------


def settings_from(args: argparse.Namespace) -> Settings:
    window = args.window or max(args.interval, 60.0)
    thresholds = Thresholds(
        max_error_rate=args.max_error_rate,
        max_p99=args.max_p99,
        max_error_rate_increase=args.max_error_rate_increase,
        max_p99_increase=args.max_p99_increase,
        min_requests=args.min_requests,
    )
    return Settings(
        plan=args.steps,
        step_duration=args.step_duration,
        interval=args.interval,
        window=window,
        failure_threshold=args.failure_threshold,
        progress_deadline=args.progress_deadline,
        gradual_abort=args.gradual_abort,
        thresholds=thresholds,
        mirror_percent=args.mirror_percent,
    )


def cmd_rollout(args: argparse.Namespace) -> int:
    errors = _target_errors(args)
    if args.steps is None:
        errors.append("--steps: required, e.g. --steps 5,10,25,50,100")
    if bool(args.prometheus) == bool(args.metrics_url):
        errors.append("exactly one metric source is required: --prometheus URL or --metrics-url URL ...")
    if args.max_p99 <= 0 or args.step_duration <= 0 or args.interval <= 0 or args.progress_deadline <= 0:
        errors.append("--max-p99, --step-duration, --interval and --progress-deadline must be above 0")
    if errors:
        return _errors(errors)
    from ..logs import setup_logging

    setup_logging(args.log_format, args.log_level)
    return _run(_rollout(args, settings_from(args)))


async def _rollout(args: argparse.Namespace, settings: Settings) -> int:
    import aiohttp

    from ..rollout.sources import PrometheusSource, ScrapeSource

    stop, caught = asyncio.Event(), [0]

    def on_signal(number: int) -> None:
        caught[0] = number
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    timeout = aiohttp.ClientTimeout(total=max(1.0, min(settings.interval, 10.0)))
    try:
        async with open_store(args) as store, aiohttp.ClientSession(timeout=timeout) as session:
            try:
                stored = await store.load()
            except (Missing, Unavailable) as exc:
                return fail(Exit.UNAVAILABLE, [str(exc)])
            route = analysed_route(stored.data, given=args.route)
            log.info("analysing route %s", route, extra={"route": route})
            source = (
                PrometheusSource(args.prometheus, session, mirror=mirrors(settings.plan), route=route)
                if args.prometheus
                else ScrapeSource(args.metrics_url, session, route=route)
            )
            hooks = _webhooks(args, store)
            try:
                code = await Controller(store, source, settings, webhooks=hooks).run(
                    restart=args.restart, stop=stop
                )
            finally:
                await hooks.close()  # and let the last events go out
    except Invalid as exc:
        return _errors([str(exc)])
    return signalled(caught[0]) if code == STOPPED else code


def analysed_route(data: Mapping[str, Any], *, given: str | None) -> str:
    """The ``route`` label of the config's series: ``--route``, else the config's own ``name``
    key, else ``default`` (a catch-all config the proxy serves alone). Invalid when the two
    disagree, or for a config with a host or path and no name: the proxies name such a route
    after their source (``FILE``, ``NAMESPACE/NAME``), which only the operator knows."""
    try:
        route = parse_route(data, name=DEFAULT_ROUTE)
    except ConfigError:
        return given or DEFAULT_ROUTE  # the controller's first load names every problem
    if route.named and given and given != route.name:
        raise Invalid(
            f"--route {given}: the config names its route {route.name!r} (its name key), "
            "and the proxies label its series with that name"
        )
    if given or route.named:
        return given or route.name
    if not route.catch_all:
        raise Invalid(
            "--route is required: the config has a host or path and no name key, so its series "
            "carry the name of the proxies' source (NAMESPACE/NAME for a ConfigMap, FILE for a file)"
        )
    return DEFAULT_ROUTE


def _webhooks(args: argparse.Namespace, store: Store) -> Webhooks:
    name = getattr(store, "name", None) or str(getattr(store, "path", store.description))
    namespace = getattr(store, "namespace", None)
    return Webhooks(
        args.webhook,
        name=name,
        namespace=namespace,
        timeout=args.webhook_timeout,
        retries=args.webhook_retries,
    )


# -- promote, abort -------------------------------------------------------------------------------


class _NothingToDo(Exception):
    """Raised inside the write when no rollout can take the command; nothing is written."""


def cmd_promote(args: argparse.Namespace) -> int:
    return _command(args, "promote-full" if args.full else "promote")


def cmd_abort(args: argparse.Namespace) -> int:
    return _command(args, "abort")


def _command(args: argparse.Namespace, action: str) -> int:
    if errors := _target_errors(args):
        return _errors(errors)
    return _run(_send(args, action))


def command_change(stored: Stored, action: str, nonce: str) -> Change:
    """The write of one command, if a rollout can take it (else _NothingToDo)."""
    state = decode(stored.annotations)
    takes = RUNNING | {"RollingBack"} if action == "abort" else RUNNING
    if state.phase not in takes:
        raise _NothingToDo(f"no rollout to {action}: phase is {state.phase or 'none (never started)'}")
    return Change(annotations={COMMAND: f"{action} {nonce}"})


async def _send(args: argparse.Namespace, action: str) -> int:
    nonce = secrets.token_hex(4)
    try:
        async with open_store(args) as store:
            stored = await store.update(lambda current: command_change(current, action, nonce))
    except _NothingToDo as exc:
        return fail(Exit.FAILED, [str(exc)])
    except (Invalid, StateError) as exc:
        return _errors([str(exc)])
    except StoreError as exc:
        return fail(Exit.UNAVAILABLE, [str(exc)])
    state = decode(stored.annotations)
    print(
        f"{store.description}: {action} requested ({state.phase}, step {state.step + 1}); "
        "a running rollout acts on it within one --interval"
    )
    return Exit.OK


# -- status ---------------------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    if errors := _target_errors(args):
        return _errors(errors)
    return _run(_status(args))


async def _status(args: argparse.Namespace) -> int:
    try:
        async with open_store(args) as store:
            stored = await store.load()
        state = decode(stored.annotations)
    except (Invalid, StateError) as exc:
        return _errors([str(exc)])
    except (Missing, StoreError) as exc:
        return fail(Exit.UNAVAILABLE, [str(exc)])
    report = status_report(store.description, stored, state)
    if args.output == "json":
        print(json.dumps(report, indent=2))
    else:
        print(format_status(report))
    return Exit.OK


HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "rollout": cmd_rollout,
    "promote": cmd_promote,
    "abort": cmd_abort,
    "status": cmd_status,
}
