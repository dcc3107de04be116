"""A rollout of one route among several: which route ``--route`` (or its default) analyses,
and a real ``rollout`` process that other routes' failures cannot roll back."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from canary_proxy.cli.rollout import analysed_route
from canary_proxy.metrics import Metrics
from canary_proxy.rollout.store import Invalid

from .rollouts import FAST, cli, file_state, metrics_page, rollout

PAIR = {"stable-url": "http://127.0.0.1:1", "canary-url": "http://127.0.0.1:2"}
HOST = {**PAIR, "host": "shop.example.com"}


@pytest.mark.parametrize(
    ("data", "given", "expected"),
    [
        (PAIR, None, "default"),  # today's config, served alone: route "default"
        (PAIR, "shop/cart", "shop/cart"),  # e.g. a ConfigMap of --configmap-selector
        ({**PAIR, "name": "cart"}, None, "cart"),  # its own name wins wherever it is loaded
        ({**PAIR, "name": " cart "}, "cart", "cart"),
        ({**HOST, "name": "cart"}, None, "cart"),
        (HOST, "shop/cart", "shop/cart"),
        ({"stable-url": "nonsense"}, None, "default"),  # the controller reports the config
    ],
)
def test_the_route_analysed(data: dict[str, Any], given: str | None, expected: str) -> None:
    assert analysed_route(data, given=given) == expected


@pytest.mark.parametrize(
    ("data", "given", "message"),
    [
        ({**PAIR, "name": "cart"}, "default", "--route default: the config names its route 'cart'"),
        (HOST, None, "--route is required: the config has a host or path and no name key"),
        ({**PAIR, "path": "/api"}, None, "--route is required"),
    ],
)
def test_a_route_the_config_contradicts_or_leaves_open(
    data: dict[str, Any], given: str | None, message: str
) -> None:
    with pytest.raises(Invalid, match=message):
        analysed_route(data, given=given)


OURS = "cart"  # the config's own name key


@pytest.fixture
async def metrics_url() -> AsyncIterator[str]:
    """A /metrics page from the proxy's own collectors, growing at each scrape: route ``cart``
    healthy, route ``default`` (served by the same proxy) failing every request on its canary."""
    metrics = Metrics(registry := CollectorRegistry())
    metrics.init_data_plane(OURS)
    metrics.init_data_plane()

    def grow() -> None:
        for _ in range(20):
            metrics.count_request(OURS, "stable", 200, "GET", 0.02)
            metrics.count_request(OURS, "canary", 200, "GET", 0.02)
            metrics.count_request("default", "stable", 200, "GET", 0.02)
            metrics.count_request("default", "canary", 503, "GET", 5.0)

    async with metrics_page(registry, grow) as port:
        yield f"http://127.0.0.1:{port}/metrics"


@pytest.fixture
def route_config(tmp_path: Path) -> Path:
    """A route's config with its own keys (name, host, path), as a ConfigMap of routes holds it."""
    path = tmp_path / "cart.yaml"
    path.write_text(yaml.safe_dump({**HOST, "name": OURS, "path": "/cart", "canary-weight": 0}))
    return path


def loaded(path: Path) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(path.read_text())
    return config


async def test_another_routes_failing_canary_does_not_roll_this_one_back(
    route_config: Path, metrics_url: str
) -> None:
    argv = ("--config", str(route_config), "--metrics-url", metrics_url, "--steps", "50,100", *FAST)
    async with rollout(*argv) as run:
        assert await run.exit_code() == 0, run.messages
    assert run.messages[0] == f"analysing route {OURS}"
    checks = [m for m in run.messages if m.startswith("check ")]
    assert checks and not any(m.startswith("check fail") for m in checks), checks
    weight, state = file_state(route_config)
    assert weight == 100 and state["canary-proxy.io/phase"] == "Promoted"
    assert loaded(route_config)["host"] == "shop.example.com"  # the route's keys are kept


async def test_the_default_route_of_that_config_is_refused(route_config: Path, metrics_url: str) -> None:
    code, _, err = await cli(
        "rollout", "--config", str(route_config), "--metrics-url", metrics_url, "--steps", "100",
        "--route", "default",
    )  # fmt: skip
    assert code == 2 and "the config names its route 'cart'" in err, err
    assert file_state(route_config)[1] == {}  # nothing written
