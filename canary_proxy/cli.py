"""The command line: flags (each also read from ``CANARY_PROXY_<FLAG>``), logging, uvloop.

This is the only module that exits the process. Exit codes: 0 success, 2 bad arguments or
an invalid config, 3 the Kubernetes API or ConfigMap is unavailable.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from collections.abc import Coroutine, Sequence
from typing import Any

from . import __version__
from .config import ConfigError, parse_config, parse_duration, parse_size

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 3


def env_name(flag: str) -> str:
    return "CANARY_PROXY_" + flag.lstrip("-").upper().replace("-", "_")


class _Parser(argparse.ArgumentParser):
    def add_env(self, flag: str, *, default: Any = None, **kwargs: Any) -> None:
        """A flag whose default comes from its environment variable; the command line wins."""
        env = env_name(flag)
        value = os.environ.get(env, default)
        shown = "none" if default is None else default
        help_text = kwargs.pop("help", "")
        self.add_argument(flag, default=value, help=f"{help_text} [env {env}; default: {shown}]", **kwargs)


def _duration(text: str) -> float:
    try:
        return parse_duration(text, allow_zero=True)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: expected {exc}") from None


def _workers(text: str) -> int:
    if str(text) == "auto":
        return len(os.sched_getaffinity(0))
    if not str(text).isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive whole number or 'auto'")
    return int(text)


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: expected {exc}") from None


def _count(text: str) -> int:
    if not str(text).isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive whole number")
    return int(text)


def _cidrs(text: str) -> tuple[str, ...]:
    import ipaddress

    cidrs = tuple(part.strip() for part in str(text).split(",") if part.strip())
    for cidr in cidrs:
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{cidr!r}: expected a CIDR such as 10.0.0.0/8") from None
    return cidrs


def _on_off(text: str) -> bool:
    if text not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"{text!r}: expected on or off")
    return text == "on"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="canary-proxy",
        description="Canary releases without a service mesh: a weighted, sticky reverse proxy.",
    )
    parser.add_argument("--version", action="version", version=f"canary-proxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    serve = sub.add_parser("serve", help="run the proxy")
    serve.add_env("--config", help="YAML config file (reloaded when it changes)")
    serve.add_env("--configmap", help="watch this [NAMESPACE/]NAME ConfigMap instead of a file")
    serve.add_env("--kubeconfig", help="kubeconfig path (default: in-cluster, $KUBECONFIG, ~/.kube/config)")
    serve.add_env("--listen", default="0.0.0.0:8080", help="public HOST:PORT")
    serve.add_env(
        "--admin-listen",
        default="0.0.0.0:9090",
        help="admin HOST:PORT (/metrics, /healthz, /readyz, /config); port 0 picks a free one",
    )
    serve.add_env(
        "--workers",
        default="1",
        type=_workers,
        help="worker processes, or 'auto' for one per usable CPU",
    )
    serve.add_env("--drain-delay", default="5s", type=_duration, help="keep serving this long after SIGTERM")
    serve.add_env(
        "--shutdown-timeout",
        default="30s",
        type=_duration,
        help="then wait this long for in-flight requests",
    )
    serve.add_env("--access-log", default="on", type=_on_off, help="JSON access log on stdout: on|off")
    serve.add_env(
        "--client-header-timeout",
        default="10s",
        type=_duration,
        help="close a client that has not sent its request head by then",
    )
    serve.add_env(
        "--keepalive-timeout",
        default="75s",
        type=_duration,
        help="close idle keep-alive client connections after this",
    )
    serve.add_env(
        "--max-header-size", default="8KiB", type=_size, help="request line + headers; beyond it 431"
    )
    serve.add_env(
        "--max-headers", default="100", type=_count, help="header fields per request; beyond it 431"
    )
    serve.add_env(
        "--max-body-size", default="0", type=_size, help="request body; beyond it 413; 0 = no limit"
    )
    serve.add_env(
        "--max-connections", default="10000", type=_count, help="open client connections; beyond it 503"
    )
    serve.add_env(
        "--underscores-in-headers",
        default="off",
        type=_on_off,
        help="forward request header names with '_' (nginx drops them: CGI maps X_A and X-A alike)",
    )
    serve.add_env(
        "--trust-forwarded-from",
        default="",
        type=_cidrs,
        help="CIDR,...: peers whose X-Forwarded-*, X-Real-IP and Forwarded are kept and appended to; "
        "from anyone else they are replaced by what the proxy saw",
    )
    serve.add_env("--tls-cert", help="PEM certificate chain: TLS on the public port (reloaded on change)")
    serve.add_env("--tls-key", help="PEM private key for --tls-cert")
    _logging_flags(serve)

    check = sub.add_parser("check", help="validate a config file and print the effective config")
    check.add_env("--config", help="YAML config file")

    demo = sub.add_parser(
        "demo",
        help="a canary rollout on loopback: two demo apps, the proxy, traffic, analysis, live view",
        description="Exit codes: 0 promoted, 1 rolled back, 2 cannot start, 130 Ctrl-C.",
    )
    demo.add_argument("--bad-canary", choices=("errors", "latency"), help="make v2 fail (default: healthy)")
    demo.add_argument("--fail-at", type=_demo_number(0, 100), default=20.0, help="v2 fails from this %% on")
    demo.add_argument("--speed", type=_demo_number(0, 10), default=1.0, help="2: twice as fast; at most 10")
    demo.add_argument("--port", type=_demo_port, default=0, help="proxy port on 127.0.0.1 (0: a free one)")
    demo.add_argument("--admin-port", type=_demo_port, default=0, help="admin port (0: a free one)")

    from .configmap_cli import add_configmap_commands

    add_configmap_commands(sub)

    from .ingress_cli import add_import_command

    add_import_command(sub)

    from .rollout.cli import add_rollout_commands

    add_rollout_commands(sub)
    return parser


def _logging_flags(parser: _Parser) -> None:
    parser.add_env("--log-format", default="json", choices=("json", "text"), help="stderr log format")
    parser.add_env(
        "--log-level",
        default="info",
        choices=("debug", "info", "warning", "error"),
        help="log level",
    )


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from .configmap_cli import cmd_get, cmd_weight

    handlers = {
        "serve": cmd_serve,
        "check": cmd_check,
        "demo": cmd_demo,
        "weight": cmd_weight,
        "get": cmd_get,
    }
    from .rollout.cli import HANDLERS as ROLLOUT_HANDLERS

    handlers.update(ROLLOUT_HANDLERS)
    from .ingress_cli import cmd_import_ingress

    handlers["import-ingress"] = cmd_import_ingress
    handler = handlers[args.command]
    sys.exit(handler(args))


def _print_errors(errors: list[str]) -> None:
    for line in errors:
        print(f"error: {line}", file=sys.stderr)


def cmd_check(args: argparse.Namespace) -> int:
    import yaml

    from .sources.file import load_file

    if not args.config:
        _print_errors(["--config: required"])
        return EXIT_USAGE
    raw = load_file(args.config)
    try:
        if raw.error is not None:
            raise raw.error
        assert raw.data is not None
        config = parse_config(raw.data)
        from .tls import validate_upstream_ca

        validate_upstream_ca(config.upstream_ca)
    except ConfigError as exc:
        _print_errors(exc.errors)
        return EXIT_USAGE
    sys.stdout.write(yaml.safe_dump(config.effective(), sort_keys=False, default_flow_style=False))
    return EXIT_OK


def _demo_number(low: float, high: float) -> Any:
    def number(text: str) -> float:
        try:
            value = float(text.removesuffix("%"))
        except ValueError:
            value = float("nan")
        if not low < value <= high:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a number above {low:g}, at most {high:g}")
        return value

    return number


def _demo_port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a port, 0 to 65535")
    return int(text)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DemoOptions, run_demo

    options = DemoOptions(
        bad_canary=args.bad_canary,
        fail_at=args.fail_at,
        speed=args.speed,
        port=args.port,
        admin_port=args.admin_port,
    )
    try:
        return run_async(run_demo(options))
    except KeyboardInterrupt:
        return 130


def cmd_serve(args: argparse.Namespace) -> int:
    if bool(args.config) == bool(args.configmap):
        _print_errors(["exactly one of --config and --configmap is required"])
        return EXIT_USAGE
    from .logs import setup_logging

    setup_logging(args.log_format, args.log_level)
    if args.workers > 1:
        # prometheus_client picks its value store at import time, so this must come first.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="canary-proxy-metrics-")
    from .app import Settings, parse_address
    from .proxy.limits import Limits

    try:
        settings = Settings(
            listen=parse_address(args.listen),
            admin_listen=parse_address(args.admin_listen),
            workers=args.workers,
            drain_delay=args.drain_delay,
            shutdown_timeout=args.shutdown_timeout,
            access_log=args.access_log,
            config_path=args.config,
            log_format=args.log_format,
            log_level=args.log_level,
            limits=Limits(
                client_header_timeout=args.client_header_timeout,
                keepalive_timeout=args.keepalive_timeout,
                max_header_size=args.max_header_size,
                max_headers=args.max_headers,
                max_body_size=args.max_body_size,
                max_connections=args.max_connections,
                underscores_in_headers=args.underscores_in_headers,
                trust_forwarded_from=args.trust_forwarded_from,
            ),
            tls_cert=args.tls_cert or None,
            tls_key=args.tls_key or None,
        )
    except ValueError as exc:
        _print_errors([str(exc)])
        return EXIT_USAGE
    tls_errors = _check_tls(settings.tls_cert, settings.tls_key)
    if tls_errors:
        _print_errors(tls_errors)
        return EXIT_USAGE
    source = _file_source(args.config) if args.config else _configmap_source(args.configmap, args.kubeconfig)
    if isinstance(source, int):
        return source
    initial, updates, origin = source
    from .memory import tune_malloc

    tune_malloc()  # before the data path allocates: see memory.py
    if settings.workers > 1:
        from .supervisor import run_supervisor

        main = run_supervisor(settings, initial=initial, updates=updates, origin=origin)
    else:
        from .app import run_single

        main = run_single(settings, initial=initial, updates=updates, origin=origin)
    try:
        return run_async(main)
    except OSError as exc:  # a port in use, or an address this host does not have
        _print_errors([f"cannot listen: {exc.strerror or exc} ({exc})"])
        return EXIT_USAGE


def _check_tls(cert: str | None, key: str | None) -> list[str]:
    if cert is None and key is None:
        return []
    if cert is None or key is None:
        return ["--tls-cert and --tls-key go together"]
    from .tls import TlsError, server_context

    try:
        server_context(cert, key)
    except TlsError as exc:
        return [f"--tls-cert/--tls-key: {exc}"]
    return []


def _file_source(path: str) -> Any:
    """A file must be valid at start-up (exit 2 otherwise); it is then followed for changes."""
    from .sources.file import load_file, watch_file

    initial = load_file(path)
    errors = _validate(initial)
    if errors:
        _print_errors(errors)
        return EXIT_USAGE
    return initial, lambda: watch_file(path, initial=initial), path


def _configmap_source(ref: str, kubeconfig: str | None) -> Any:
    """A ConfigMap is followed from the start; until it loads, /readyz says 503.

    Only a kubeconfig that cannot be loaded at all is fatal: an API that is down, or a
    ConfigMap that does not exist yet, is waited for.
    """
    from .k8s import load_config, parse_ref
    from .sources.configmap import follow_configmap

    try:
        parse_ref(ref)
        config = asyncio.run(load_config(kubeconfig))
    except Exception as exc:  # any loader failure (missing file, bad YAML, no context)
        _print_errors([f"--configmap {ref}: cannot load Kubernetes client config: {exc}"])
        return EXIT_USAGE
    namespace, name = parse_ref(ref)
    origin = f"configmap {namespace or config.namespace}/{name}"
    return None, lambda: follow_configmap(ref, kubeconfig=kubeconfig), origin


def _validate(raw: Any) -> list[str]:
    if raw.error is not None:
        return list(raw.error.errors)
    try:
        parse_config(raw.data)
    except ConfigError as exc:
        return exc.errors
    return []


def run_async(coro: Coroutine[Any, Any, int]) -> int:
    """Run on uvloop where it is installed, else on the standard asyncio loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)
