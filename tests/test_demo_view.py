"""The demo's two views, rendered from a model: the live ``rich`` screen and the plain lines."""

from __future__ import annotations

import io

from rich.console import Console

from canary_proxy.demo.model import CheckRow, DemoModel, DemoOptions, ServiceModel, VersionNow, version_now
from canary_proxy.demo.view import LiveView, PlainView
from canary_proxy.rollout.plan import parse_plan


def failing(service: ServiceModel) -> ServiceModel:
    """A service whose bad canary fails at step 3, with its numbers now and one failed check."""
    service.phase, service.step, service.weight, service.fault_active = "Progressing", "3/5 (25%)", 25.0, True
    service.versions["stable"] = VersionNow(rate=120.0, error_rate=0.0, p50=0.175, p99=0.2485)
    service.versions["canary"] = VersionNow(rate=40.0, error_rate=0.3, p50=0.175, p99=0.2485)
    service.users.update(stable=24, canary=8)
    stats = {"requests": 36, "errors": 11, "errorRate": 11 / 36, "p99": 0.2485}
    reasons = ["error rate 30.56% > max 1.00%"]
    service.checks.append(
        CheckRow(11.5, "3/5 (25%)", "fail", stats, {}, reasons, "check fail at step 3/5 (25%): ...")
    )
    return service


def model(services: int = 1) -> DemoModel:
    m = DemoModel(DemoOptions(bad_canary="errors", services=services), parse_plan("5,10,25,50,100"))
    m.urls = {"proxy": "http://127.0.0.1:8080", "dashboard": "http://127.0.0.1:9090/"}
    failing(m.services[0])
    m.events.append((10.3, "canary v2 starts failing now", True))
    return m


def test_the_live_view_shows_phase_weight_versions_and_verdicts() -> None:
    view = LiveView()
    buffer = io.StringIO()
    view.console = Console(file=buffer, width=160, color_system=None)
    view.console.print(view.render(model()))
    screen = buffer.getvalue()
    for text in (
        "Progressing",
        "3/5 (25%)",
        "25%",
        "failing now (errors)",
        "http://127.0.0.1:9090/",
        "│ canary v2 │  40.0 │ 30.00% │ 175.0ms │ 248.5ms │            8 │",
        "36 req, 30.56% 5xx, p99 248.5ms",
        "error rate 30.56% > max 1.00%",
        "canary v2 starts failing now",
    ):
        assert text in screen, (text, screen)


def test_the_plain_view_prints_events_summaries_and_the_result() -> None:
    out = io.StringIO()
    view, m = PlainView(out), model()
    view.start(m)
    view.event(m, "rollout started: steps 5,10,25,50,100; step 1/5 (5%)")
    view.next_summary = 0
    view.tick(m)
    view.close(m, 1)
    lines = out.getvalue().splitlines()
    assert lines[0] == (
        "canary-proxy demo: a rollout through 5,10,25,50,100 on loopback; "
        "bad canary: v2 starts failing (errors) once it serves 20% of traffic"
    )
    assert lines[1] == "  proxy      http://127.0.0.1:8080"
    assert lines[-3].endswith("] rollout started: steps 5,10,25,50,100; step 1/5 (5%)")
    assert lines[-2].endswith(
        "] traffic: weight 25% | stable v1 120.0 req/s, 0.00% 5xx, p99 248.5ms | "
        "canary v2 40.0 req/s, 30.00% 5xx, p99 248.5ms | sticky users: 24 on stable, 8 on canary"
    )
    assert lines[-1] == "result: rolled back (exit 1)"


def test_version_now_pools_the_last_points() -> None:
    series = {
        "canary": {"requestRate": [10.0, 30.0, 10.0], "errorRate": [0.0, 0.5, None], "p99": [0.2, None, None]}
    }
    now = version_now(series, "canary")
    assert now.rate == 50 / 3 and now.error_rate == 15 / 50 and now.p99 == 0.2 and now.p50 is None


def test_two_services_each_have_their_section_and_their_lines() -> None:
    m = model(services=2)
    shop, blog = m.services
    assert (shop.name, shop.host, shop.bad_canary) == ("shop", "shop.localhost", "errors")
    assert (blog.name, blog.host, blog.bad_canary) == ("blog", "blog.localhost", None)
    blog.phase, blog.step, blog.weight = "Promoted", "5/5 (100%)", 100.0
    blog.versions["canary"] = VersionNow(rate=150.0, error_rate=0.0, p50=0.14, p99=0.1985)

    view = LiveView()
    buffer = io.StringIO()
    view.console = Console(file=buffer, width=160, color_system=None)
    view.console.print(view.render(m))
    screen = buffer.getvalue()
    for text in (
        "dashboard http://127.0.0.1:9090/",
        "shop: host shop.localhost",
        "blog: host blog.localhost",
        "failing now (errors)",
        "│ canary v2 │  40.0 │ 30.00% │ 175.0ms │ 248.5ms │            8 │",
        "Promoted",
        "│ canary v2 │ 150.0 │ 0.00% │ 140.0ms │ 198.5ms │            0 │",
        "36 req, 30.56% 5xx, p99 248.5ms",
    ):
        assert text in screen, (text, screen)
    assert screen.index("shop: host") < screen.index("blog: host")

    out = io.StringIO()
    plain = PlainView(out)
    plain.start(m)
    plain.next_summary = 0
    plain.tick(m)
    shop.served, blog.served = {"stable": 700.0, "canary": 112.0}, {"stable": 480.0, "canary": 370.0}
    shop.result, blog.result = 1, 0
    plain.close(m, 1)
    lines = out.getvalue().splitlines()
    assert lines[:3] == [
        "canary-proxy demo: 2 services behind one proxy, each a rollout through 5,10,25,50,100 on loopback",
        "  shop: host shop.localhost; bad canary: v2 starts failing (errors) once it serves 20% of traffic",
        "  blog: host blog.localhost; healthy canary",
    ]
    assert "  try: curl -i -H 'Host: shop.localhost' http://127.0.0.1:8080/" in lines[5]
    assert lines[-5].endswith(
        "] shop: traffic: weight 25% | stable v1 120.0 req/s, 0.00% 5xx, p99 248.5ms | "
        "canary v2 40.0 req/s, 30.00% 5xx, p99 248.5ms | sticky users: 24 on stable, 8 on canary"
    )
    assert lines[-4].endswith(
        "] blog: traffic: weight 100% | stable v1 n/a, n/a 5xx, p99 n/a | "
        "canary v2 150.0 req/s, 0.00% 5xx, p99 198.5ms | sticky users: 0 on stable, 0 on canary"
    )
    assert lines[-3:] == [
        "shop: rolled back; served 812 requests (700 by stable v1, 112 by canary v2)",
        "blog: promoted; served 850 requests (480 by stable v1, 370 by canary v2)",
        "result: rolled back (exit 1)",
    ]
