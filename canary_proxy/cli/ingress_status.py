"""``serve --ingress-class``'s status flags: who publishes the Ingresses' ADDRESS, and how the
one replica that writes it is elected (``canary_proxy/ingress_status.py`` does the work)."""

from __future__ import annotations

import argparse
import logging
from typing import TYPE_CHECKING, Any

from ..runner import Exit, Fatal
from .args import duration, env_flag, on_off

if TYPE_CHECKING:
    from ..ingress_status import StatusWriter


def status_flags(parser: Any) -> None:
    env_flag(
        parser,
        "--publish-service",
        metavar="[NAMESPACE/]NAME",
        help="with --ingress-class: write this Service's address (a LoadBalancer's, followed live) "
        "into the status of the Ingresses served, as ingress-nginx's --publish-service",
    )
    env_flag(
        parser,
        "--publish-address",
        metavar="IP|HOSTNAME[,...]",
        help="with --ingress-class: write these addresses into the Ingresses' status instead, as "
        "ingress-nginx's --publish-status-address",
    )
    env_flag(
        parser,
        "--election-id",
        metavar="NAME",
        shown="canary-proxy-leader-CLASS",
        help="with --publish-*: the Lease, in the proxy's own namespace, that elects the one "
        "replica that writes status",
    )
    env_flag(
        parser,
        "--update-status-on-shutdown",
        default="off",
        type=on_off,
        help="with --publish-*: the leader clears the address it wrote when it stops",
    )
    env_flag(
        parser,
        "--leader-elect-lease-duration",
        default="15s",
        type=duration,
        help="with --publish-*: how long the others wait, from the leader's last renewal, to take over",
    )
    env_flag(
        parser,
        "--leader-elect-renew-deadline",
        default="10s",
        type=duration,
        help="with --publish-*: the leader stops writing when it could not renew for this long",
    )
    env_flag(
        parser,
        "--leader-elect-retry-period",
        default="2s",
        type=duration,
        help="with --publish-*: between attempts to acquire or renew the Lease",
    )


def status_writer(args: argparse.Namespace, *, own_namespace: str) -> StatusWriter | None:
    """With --publish-service or --publish-address: the Ingress status writer, elected on a
    Lease in the proxy's own namespace (where deploy/ingress-mode's Role allows it, as
    ingress-nginx keeps its election in its pod's namespace, whatever it watches)."""
    from ..ingress_status import (
        PublishAddress,
        PublishService,
        StatusWriter,
        lease_name,
        parse_publish_address,
    )
    from ..k8s import parse_ref
    from ..k8s.lease import LeaseRef, LeaseTiming

    publish: PublishAddress | PublishService
    if args.publish_address:
        try:
            publish = PublishAddress(parse_publish_address(args.publish_address))
        except ValueError as exc:
            raise Fatal(
                Exit.USAGE, f"--publish-address: invalid value {args.publish_address!r}: {exc}"
            ) from None
    elif args.publish_service:
        try:
            namespace, name = parse_ref(args.publish_service)
        except ValueError as exc:
            raise Fatal(Exit.USAGE, f"--publish-service: {exc}") from None
        publish = PublishService(namespace or own_namespace, name)
    else:
        logging.getLogger(__name__).info(
            "no --publish-service or --publish-address: the Ingresses' status is not written"
        )
        return None
    election = args.election_id or lease_name(args.ingress_class)
    try:
        parse_ref(election)
        if "/" in election:
            raise ValueError("a name, without a namespace: the Lease is in the proxy's own namespace")
        timing = LeaseTiming(
            lease_duration=args.leader_elect_lease_duration,
            renew_deadline=args.leader_elect_renew_deadline,
            retry_period=args.leader_elect_retry_period,
        )
    except ValueError as exc:
        raise Fatal(Exit.USAGE, f"leader election: {exc}") from None
    return StatusWriter(
        publish=publish,
        lease=LeaseRef(own_namespace, election),
        namespace=args.namespace or None,
        timing=timing,
        clear_on_shutdown=args.update_status_on_shutdown,
    )
