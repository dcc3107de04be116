"""``serve`` (run the proxy) and ``check`` (validate a config file and print it)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from ..ingress import DEFAULT_CLASS as DEFAULT_INGRESS_CLASS
from ..runner import Exit, Fatal, run_async
from .args import (
    KUBECONFIG_HELP,
    address,
    cidrs,
    count,
    duration,
    env_flag,
    logging_flags,
    on_off,
    size,
    workers,
)
from .ingress_status import status_flags, status_writer

if TYPE_CHECKING:
    from ..serve.settings import Settings
    from ..sources.raw import RawConfig
    from ..tls_store import TlsStore

Source = tuple["RawConfig | None", Callable[[], AsyncIterator["RawConfig"]], str]

DEFAULT_TLS_LISTEN = "0.0.0.0:8443"  # Ingress mode's HTTPS port, as ingress-nginx's 443 behind a Service

SERVE_DESCRIPTION = """\
Run the proxy: send each request to stable or canary (by header, cookie, then the weight),
follow the config source for changes, and drain on SIGTERM. Start-up errors are plain
"error:" lines and exit 2; after start-up, everything is logged as JSON lines on stderr."""
CHECK_DESCRIPTION = """\
Validate a config file as serve would, and print the effective config (every key, with its
default filled in) as YAML. On errors, list every one of them and exit 2."""
SERVE_EXAMPLE = """\
example:
  canary-proxy serve --config canary.yaml --listen 0.0.0.0:8080 --admin-listen 127.0.0.1:9090
  canary-proxy serve --configmap shop/canary-proxy --workers auto
"""
CHECK_EXAMPLE = """\
example:
  canary-proxy check --config canary.yaml    # exit 0 and the effective config, or 2 and every error
"""


def add_commands(sub: Any) -> None:
    raw = argparse.RawDescriptionHelpFormatter
    serve = sub.add_parser(
        "serve",
        help="run the proxy",
        description=SERVE_DESCRIPTION,
        epilog=SERVE_EXAMPLE,
        formatter_class=raw,
    )
    env_flag(
        serve,
        "--config",
        metavar="FILE",
        help="YAML config file (reloaded when it changes); several documents (---) are one route each",
    )
    env_flag(
        serve,
        "--config-dir",
        metavar="DIR",
        help="every *.yaml in DIR is a route (or one per document); files come and go live",
    )
    env_flag(
        serve,
        "--configmap",
        metavar="[NAMESPACE/]NAME",
        help="watch this ConfigMap instead of a file",
    )
    env_flag(
        serve,
        "--configmap-selector",
        metavar="KEY=VALUE[,...]",
        help="every ConfigMap this label selector matches is a route, named NAMESPACE/NAME",
    )
    env_flag(
        serve,
        "--ingress-class",
        metavar="NAME",
        nargs="?",
        const=DEFAULT_INGRESS_CLASS,
        help="Ingress mode: serve the Ingresses of this class (alone: canary-proxy), with their "
        "ingress-nginx canary annotations",
    )
    env_flag(
        serve,
        "--annotation-prefix",
        metavar="PREFIX",
        default="nginx.ingress.kubernetes.io",
        help="with --ingress-class: the annotations' prefix, as ingress-nginx's --annotations-prefix",
    )
    status_flags(serve)
    env_flag(
        serve,
        "--namespace",
        metavar="NAMESPACE",
        help="with --configmap-selector (default: the kubeconfig's namespace) or --ingress-class "
        "(default: all): the namespace to watch",
    )
    serve.add_argument(
        "--all-namespaces",
        action="store_true",
        default=os.environ.get("CANARY_PROXY_ALL_NAMESPACES", "") in ("1", "true", "on"),
        help="with --configmap-selector: watch every namespace [env CANARY_PROXY_ALL_NAMESPACES]",
    )
    env_flag(serve, "--kubeconfig", metavar="FILE", help=KUBECONFIG_HELP)
    env_flag(
        serve,
        "--default-backend",
        metavar="URL",
        help="http(s)://host:port that takes requests no route matches (else they get 404)",
    )
    env_flag(serve, "--listen", default="0.0.0.0:8080", type=address, help="the public port")
    env_flag(
        serve,
        "--admin-listen",
        default="0.0.0.0:9090",
        type=address,
        help="the admin port: / (dashboard), /stats, /metrics, /healthz, /readyz, /config; "
        "port 0 picks a free one",
    )
    env_flag(serve, "--workers", default="1", type=workers, help="worker processes; auto: one per usable CPU")
    env_flag(serve, "--drain-delay", default="5s", type=duration, help="keep serving this long after SIGTERM")
    env_flag(
        serve,
        "--shutdown-timeout",
        default="30s",
        type=duration,
        help="then wait this long for in-flight requests",
    )
    env_flag(serve, "--access-log", default="on", type=on_off, help="JSON access log on stdout")
    env_flag(
        serve,
        "--client-header-timeout",
        default="10s",
        type=duration,
        help="close a client that has not sent its request head by then",
    )
    env_flag(
        serve,
        "--keepalive-timeout",
        default="75s",
        type=duration,
        help="close idle keep-alive client connections after this",
    )
    env_flag(
        serve, "--max-header-size", default="8KiB", type=size, help="request line + headers; beyond it 431"
    )
    env_flag(
        serve, "--max-headers", default="100", type=count, help="header fields per request; beyond it 431"
    )
    env_flag(
        serve, "--max-body-size", default="0", type=size, help="request body; beyond it 413; 0 = no limit"
    )
    env_flag(
        serve, "--max-connections", default="10000", type=count, help="open client connections; beyond it 503"
    )
    env_flag(
        serve,
        "--underscores-in-headers",
        default="off",
        type=on_off,
        help="forward request header names with '_' (nginx drops them: CGI maps X_A and X-A alike)",
    )
    env_flag(
        serve,
        "--trust-forwarded-from",
        default="",
        type=cidrs,
        help="peers whose X-Forwarded-*, X-Real-IP and Forwarded are kept and appended to; "
        "from anyone else they are replaced by what the proxy saw",
    )
    env_flag(
        serve,
        "--tls-cert",
        metavar="FILE",
        help="PEM certificate chain: TLS on the public port (reloaded on change)",
    )
    env_flag(serve, "--tls-key", metavar="FILE", help="PEM private key for --tls-cert")
    env_flag(
        serve,
        "--tls-listen",
        metavar="HOST:PORT|off",
        help="with --ingress-class: the HTTPS port, a certificate per host from the Ingresses' "
        "TLS Secrets (default 0.0.0.0:8443; off: none)",
    )
    env_flag(
        serve,
        "--default-tls-secret",
        metavar="NAMESPACE/NAME",
        help="with --ingress-class: the kubernetes.io/tls Secret for clients without SNI and hosts "
        "without a certificate (default: a self-signed placeholder made at start)",
    )
    env_flag(
        serve,
        "--nginx-metrics",
        type=on_off,
        shown="on with --ingress-class, else off",
        help="export ingress-nginx's request metrics (nginx_ingress_controller_*) for routes "
        "read from Ingresses, as Flagger's nginx checks query them",
    )
    logging_flags(serve)

    check = sub.add_parser(
        "check",
        help="validate a config file and print the effective config",
        description=CHECK_DESCRIPTION,
        epilog=CHECK_EXAMPLE,
        formatter_class=raw,
    )
    env_flag(check, "--config", metavar="FILE", help="YAML config file (one route per document)")
    env_flag(check, "--config-dir", metavar="DIR", help="every *.yaml in DIR, one route each")


def cmd_check(args: argparse.Namespace) -> int:
    import yaml

    from ..config import ConfigError
    from ..control import load
    from ..sources.file import load_dir, load_file

    if bool(args.config) == bool(args.config_dir):
        raise Fatal(Exit.USAGE, "exactly one of --config and --config-dir is required")
    raw = load_file(args.config) if args.config else load_dir(args.config_dir)
    try:
        routes = load(raw, origin=args.config or args.config_dir)
    except ConfigError as exc:
        raise Fatal(Exit.USAGE, *exc.errors) from None
    sys.stdout.write(yaml.safe_dump(routes.document(), sort_keys=False, default_flow_style=False))
    for message in routes.messages():
        print(f"warning: {message}", file=sys.stderr)
    return Exit.OK


def cmd_serve(args: argparse.Namespace) -> int:
    sources = [args.config, args.config_dir, args.configmap, args.configmap_selector, args.ingress_class]
    if sum(bool(s) for s in sources) != 1:
        raise Fatal(
            Exit.USAGE,
            "exactly one of --config, --config-dir, --configmap, --configmap-selector and "
            "--ingress-class is required",
        )
    if args.namespace and not (args.configmap_selector or args.ingress_class):
        raise Fatal(Exit.USAGE, "--namespace goes with --configmap-selector or --ingress-class")
    if args.all_namespaces and not (args.configmap_selector or args.ingress_class):
        raise Fatal(Exit.USAGE, "--all-namespaces goes with --configmap-selector or --ingress-class")
    if args.namespace and args.all_namespaces:
        raise Fatal(Exit.USAGE, "--namespace and --all-namespaces exclude each other")
    if (args.publish_service or args.publish_address) and not args.ingress_class:
        raise Fatal(Exit.USAGE, "--publish-service and --publish-address go with --ingress-class")
    if args.publish_service and args.publish_address:
        raise Fatal(Exit.USAGE, "--publish-service and --publish-address exclude each other")
    _check_default_backend(args.default_backend)
    from ..logs import setup_logging

    setup_logging(args.log_format, args.log_level)
    if args.workers > 1:
        # prometheus_client picks its value store at import time, so this must come first.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="canary-proxy-metrics-")
    from ..address import ListenError
    from ..memory import tune_malloc
    from ..serve.settings import Settings
    from ..tls import TlsError

    tls = {"tls_cert": args.tls_cert or None, "tls_key": args.tls_key or None, **_ingress_tls(args)}
    nginx = {"nginx_metrics": _nginx_metrics(args)}
    settings = Settings.from_options({**vars(args), **tls, **nginx, "config_path": args.config})
    _check_tls(settings.tls_cert, settings.tls_key)
    store = None  # Ingress mode's certificates, with its HTTPS port
    if args.config:
        initial, updates, origin = _file_source(args.config)
    elif args.config_dir:
        initial, updates, origin = _dir_source(args.config_dir)
    elif args.configmap:
        initial, updates, origin = _configmap_source(args)
    elif args.ingress_class:
        initial, updates, origin, store = _ingress_source(args, settings)
    else:
        initial, updates, origin = _selector_source(args)
    tune_malloc()  # before the data path allocates: see memory.py
    if settings.workers > 1:
        from ..serve.supervisor import run_supervisor as run
    else:
        from ..serve.single import run_single as run
    try:
        return run_async(run(settings, initial=initial, updates=updates, origin=origin, tls=store))
    except ListenError as exc:  # a port in use, or an address this host does not have
        raise Fatal(Exit.USAGE, str(exc)) from None
    except TlsError as exc:  # the pair changed since _check_tls read it
        raise Fatal(Exit.USAGE, f"--tls-cert/--tls-key: {exc}") from None


def _ingress_tls(args: argparse.Namespace) -> dict[str, Any]:
    """--tls-listen and --default-tls-secret as settings: Ingress mode's HTTPS port (on
    0.0.0.0:8443 unless said, or ``off``), and no other mode's."""
    listen, secret = args.tls_listen, args.default_tls_secret or None
    if not args.ingress_class:
        if listen or secret:
            raise Fatal(Exit.USAGE, "--tls-listen and --default-tls-secret go with --ingress-class")
        return {"tls_listen": None, "default_tls_secret": None}
    if args.tls_cert or args.tls_key:
        raise Fatal(
            Exit.USAGE,
            "--tls-cert/--tls-key make --listen TLS, outside Ingress mode; with --ingress-class "
            "certificates come from the Ingresses' Secrets (--default-tls-secret for the rest)",
        )
    from ..address import parse_address
    from ..certs import parse_secret_ref

    if listen == "off":
        if secret:
            raise Fatal(Exit.USAGE, "--default-tls-secret needs the HTTPS port (--tls-listen is off)")
        return {"tls_listen": None, "default_tls_secret": None}
    try:
        address = parse_address(listen or DEFAULT_TLS_LISTEN)
    except ValueError as exc:
        raise Fatal(Exit.USAGE, f"--tls-listen: invalid value {listen!r}; expected {exc} or off") from None
    if secret:
        try:
            secret = "/".join(parse_secret_ref(secret, default_namespace=args.namespace or "default"))
        except ValueError as exc:
            raise Fatal(
                Exit.USAGE, f"--default-tls-secret: invalid value {secret!r}; expected {exc}"
            ) from None
    return {"tls_listen": address, "default_tls_secret": secret}


def _nginx_metrics(args: argparse.Namespace) -> bool:
    """--nginx-metrics as given, else on in Ingress mode: only routes read from an Ingress
    have the labels, and only there was ingress-nginx the proxy before."""
    given: bool | None = args.nginx_metrics
    return bool(args.ingress_class) if given is None else given


def _check_tls(cert: str | None, key: str | None) -> None:
    if cert is None and key is None:
        return
    if cert is None or key is None:
        raise Fatal(Exit.USAGE, "--tls-cert and --tls-key go together")
    from ..tls import TlsError, server_context

    try:
        server_context(cert, key)
    except TlsError as exc:
        raise Fatal(Exit.USAGE, f"--tls-cert/--tls-key: {exc}") from None


def _check_default_backend(url: str | None) -> None:
    if not url:
        return
    from ..config import parse_upstream

    try:
        parse_upstream(url)
    except ValueError as exc:
        raise Fatal(Exit.USAGE, f"--default-backend: invalid value {url!r}; expected {exc}") from None


def _dir_source(directory: str) -> Source:
    """Every route in the directory must be valid at start-up (exit 2 otherwise); files are
    then followed as they come, change and go."""
    from ..config import ConfigError
    from ..control import load
    from ..sources.file import Cache, load_dir, watch_dir

    cache: Cache = {}  # what was read: the watch reads again only the files that change
    initial = load_dir(directory, cache=cache)
    try:
        load(initial, origin=directory)
    except ConfigError as exc:
        raise Fatal(Exit.USAGE, *exc.errors) from None
    return initial, lambda: watch_dir(directory, initial=initial, cache=cache), directory


def _file_source(path: str) -> Source:
    """A file must be valid at start-up (exit 2 otherwise); it is then followed for changes."""
    from ..config import ConfigError
    from ..control import load
    from ..sources.file import load_file, watch_file

    initial = load_file(path)
    try:
        load(initial, origin=path)
    except ConfigError as exc:
        raise Fatal(Exit.USAGE, *exc.errors) from None
    return initial, lambda: watch_file(path, initial=initial), path


def _selector_source(args: argparse.Namespace) -> Source:
    """Every matching ConfigMap is a route, followed from the start (as ``--configmap``):
    a malformed selector or a kubeconfig that cannot be loaded is fatal, an API that is
    down is waited for."""
    from ..k8s import check_label_selector, load_config
    from ..sources.configmap import follow_configmap_selector

    selector, kubeconfig = args.configmap_selector, args.kubeconfig
    try:
        check_label_selector(selector)
    except ValueError as exc:
        raise Fatal(Exit.USAGE, f"--configmap-selector: invalid value {selector!r}; expected {exc}") from None
    try:
        config = asyncio.run(load_config(kubeconfig))
    except Exception as exc:  # any loader failure (missing file, bad YAML, no context)
        raise Fatal(
            Exit.USAGE, f"--configmap-selector: cannot load Kubernetes client config: {exc}"
        ) from None
    namespace = None if args.all_namespaces else (args.namespace or config.namespace)
    origin = f"configmaps {selector} in {namespace or 'all namespaces'}"

    def updates() -> AsyncIterator[RawConfig]:
        return follow_configmap_selector(selector, namespace=namespace, kubeconfig=kubeconfig)

    return None, updates, origin


def _ingress_source(args: argparse.Namespace, settings: Settings) -> tuple[*Source, TlsStore | None]:
    """Ingress mode: the Ingresses of the class and their Services, followed from the start
    in every namespace (or ``--namespace``); until both are listed, /readyz says 503. Only a
    kubeconfig that cannot be loaded is fatal: an API that is down is waited for."""
    from ..k8s import load_config
    from ..sources.ingress import IngressSource

    try:
        config = asyncio.run(load_config(args.kubeconfig))
    except Exception as exc:  # any loader failure (missing file, bad YAML, no context)
        raise Fatal(Exit.USAGE, f"--ingress-class: cannot load Kubernetes client config: {exc}") from None
    prefix = args.annotation_prefix.strip().rstrip("/")
    if not prefix:
        raise Fatal(Exit.USAGE, "--annotation-prefix: must not be empty")
    source = IngressSource(
        kubeconfig=args.kubeconfig,
        namespace=args.namespace or None,
        ingress_class=args.ingress_class,
        annotation_prefix=prefix,
    )
    writer = status_writer(args, own_namespace=config.namespace)
    if writer is not None:
        source.on_claimed.append(writer.claimed)
        source.tasks.append(writer.run)
    store = None
    if settings.tls_listen is not None:
        from ..serve.https import follow_certificates, tls_store

        store = tls_store(settings, metrics=None)  # its metrics: the process's, once made
        follow_certificates(store, source, namespace=args.namespace or None)
    return None, source.follow, source.describe(), store


def _configmap_source(args: argparse.Namespace) -> Source:
    """A ConfigMap is followed from the start; until it loads, /readyz says 503.

    Only a kubeconfig that cannot be loaded at all is fatal: an API that is down, or a
    ConfigMap that does not exist yet, is waited for.
    """
    from ..k8s import load_config, parse_ref
    from ..sources.configmap import follow_configmap

    ref, kubeconfig = args.configmap, args.kubeconfig
    try:
        namespace, name = parse_ref(ref)
        config = asyncio.run(load_config(kubeconfig))
    except Exception as exc:  # any loader failure (missing file, bad YAML, no context)
        raise Fatal(Exit.USAGE, f"--configmap {ref}: cannot load Kubernetes client config: {exc}") from None
    origin = f"configmap {namespace or config.namespace}/{name}"
    return None, lambda: follow_configmap(ref, kubeconfig=kubeconfig), origin


HANDLERS = {"serve": cmd_serve, "check": cmd_check}
