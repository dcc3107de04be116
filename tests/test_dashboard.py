"""The admin port's dashboard in a real headless browser: Debian's Chromium driven by Selenium.

The page is loaded from the real proxy process while traffic flows. Selenium's calls block,
so they run in a thread: the backends live in the test's event loop and must keep serving.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from canary_proxy.rollout.state import RolloutState, encode

from .conftest import Backend, ProxyFactory, base_config
from .rollouts import traffic

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--window-size=1400,1250",
)
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
DOCS = ARTIFACTS.with_name("docs")

# True once both versions have a non-zero request rate and a p99 in the charts' data.
BOTH_VERSIONS_DRAWN = """
const d = window.dashboard;
if (!d || !d.stats) return false;
const some = (xs) => xs.some((v) => v != null && v > 0);
const r = d.charts.requests.data, l = d.charts.latency.data;
return r[0].length >= 2 && some(r[1]) && some(r[2]) && some(l[2]) && some(l[4]);
"""

# The requests chart's legend as the page shows it: {series label: value text}.
LEGEND = """
const rows = document.querySelectorAll("#chart-requests .u-legend .u-series");
const text = (r, cls) => r.querySelector(cls).textContent;
return Object.fromEntries([...rows].map((r) => [text(r, ".u-label"), text(r, ".u-value")]));
"""


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.fail(
            f"{CHROMIUM} and {CHROMEDRIVER} are needed (apt-get install -y chromium chromium-driver, "
            "as scripts/bootstrap does); this test must not be skipped"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM  # with the driver's path below: no Selenium Manager download
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    service = Service(executable_path=CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(20)
    driver.set_script_timeout(10)
    try:
        yield driver
    finally:
        driver.quit()


async def wait_for(driver: Any, condition: Callable[[Any], Any], timeout: float = 20, what: str = "") -> Any:
    """Selenium's bounded poll of the page, in a thread so the event loop keeps serving."""
    from selenium.webdriver.support.ui import WebDriverWait

    def wait() -> Any:
        return WebDriverWait(driver, timeout, poll_frequency=0.2).until(condition, message=what)

    return await asyncio.to_thread(wait)


def text_of(element_id: str, expected: str) -> Callable[[Any], bool]:
    from selenium.webdriver.common.by import By

    return lambda d: bool(d.find_element(By.ID, element_id).text == expected)


def record_rollout(config_path: Path, **fields: Any) -> None:
    """A rollout's state beside the config, as ``rollout --config FILE`` records it."""
    now = time.time()
    state = RolloutState(step_started=now, progress_since=now, **fields)
    notes = {key: value for key, value in encode(state).items() if value is not None}
    config_path.with_name(config_path.name + ".rollout.json").write_text(json.dumps(notes))


async def test_the_dashboard_charts_both_versions_and_follows_the_weight(
    backends: tuple[Backend, Backend], proxy_factory: ProxyFactory, browser: Any
) -> None:
    from selenium.webdriver.common.by import By

    stable, canary = backends
    stable.delay, canary.delay = 0.02, 0.06
    config = base_config(stable, canary, canary_weight=30)
    proxy = await proxy_factory(config, "--access-log", "off")
    record_rollout(proxy.config_path, phase="Progressing", steps="30,60,100", message="at step 1/3 (30%)")

    async with traffic(proxy.url, concurrency=8):
        await asyncio.to_thread(browser.get, proxy.admin_url + "/")
        assert await wait_for(browser, lambda d: d.execute_script(BOTH_VERSIONS_DRAWN), what="both versions")
        await wait_for(browser, text_of("weight", "30%"), what="weight 30%")
        await wait_for(browser, text_of("phase", "Progressing"), what="phase")
        legend = await asyncio.to_thread(browser.execute_script, LEGEND)
        assert legend.keys() >= {"stable", "canary"}, legend  # the newest value beside each name
        assert all(float(legend[v]) > 0 for v in ("stable", "canary")), legend

        await proxy.reload({**config, "canary-weight": 60})
        record_rollout(
            proxy.config_path,
            phase="Progressing",
            steps="30,60,100",
            step=1,
            message="step done; now at step 2/3 (60%)",
        )
        await wait_for(browser, text_of("weight", "60%"), what="weight 60%")
        await wait_for(browser, text_of("step", "2/3 (60%)"), what="step 2/3")
        weights = await asyncio.to_thread(
            browser.execute_script, "return window.dashboard.charts.weight.data[1];"
        )
        assert 30 in weights and 60 in weights
        config_text = await asyncio.to_thread(lambda: browser.find_element(By.ID, "config").text)
        assert "canary-weight: 60" in config_text and f'stable-url: "{stable.url}"' in config_text
        decisions = await asyncio.to_thread(lambda: browser.find_element(By.ID, "decisions").text)
        assert "weight" in decisions
        picker = await asyncio.to_thread(lambda: browser.find_element(By.ID, "route-picker").is_displayed())
        assert picker is False  # one route: nothing to pick

        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "dashboard.png"
        assert await asyncio.to_thread(browser.save_screenshot, str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get("CANARY_PROXY_UPDATE_DOCS"):  # refresh the README's picture on purpose only
        shutil.copyfile(shot, DOCS / "dashboard.png")


# The route charted, and whether each version of its requests chart ever had traffic.
CHARTED = """
const d = window.dashboard;
if (!d || !d.stats) return null;
const r = d.charts.requests.data;
const some = (xs) => xs.some((v) => v != null && v > 0);
return {route: d.stats.route, stable: some(r[1]), canary: some(r[2]), points: r[0].length};
"""


async def test_with_two_routes_a_selector_picks_the_route_charted(
    backends: tuple[Backend, Backend], proxy_factory: ProxyFactory, browser: Any, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    stable, canary = backends
    config = tmp_path / "routes.yaml"
    shop = {**base_config(stable, canary, canary_weight=0), "name": "shop", "host": "shop.example"}
    blog = {**base_config(stable, canary, canary_weight=100), "name": "blog", "host": "blog.example"}
    config.write_text(yaml.safe_dump_all([shop, blog]))
    proxy = await proxy_factory(None, "--access-log", "off", config_path=config)

    def charted(route: str, version: str) -> Callable[[Any], bool]:
        def check(d: Any) -> bool:
            now = d.execute_script(CHARTED)
            return bool(now and now["route"] == route and now["points"] >= 2 and now[version])

        return check

    async with (
        traffic(proxy.url, concurrency=2, headers={"Host": "shop.example"}),
        traffic(proxy.url, concurrency=2, headers={"Host": "blog.example"}),
    ):
        await asyncio.to_thread(browser.get, proxy.admin_url + "/")
        await wait_for(browser, charted("shop", "stable"), what="shop's stable charted")  # the first
        await wait_for(browser, text_of("weight", "0%"), what="shop's weight")
        await wait_for(browser, text_of("phase", "\u2013"), what="no claim about shop's rollout")
        picker = await asyncio.to_thread(lambda: browser.find_element(By.ID, "route"))
        assert await asyncio.to_thread(lambda: picker.is_displayed())
        names = await asyncio.to_thread(lambda: [o.text for o in Select(picker).options])
        assert names == ["shop", "blog"]
        shown = await asyncio.to_thread(browser.execute_script, CHARTED)
        assert not shown["canary"], shown  # weight 0: only blog's requests reach a canary

        await asyncio.to_thread(lambda: Select(picker).select_by_visible_text("blog"))
        await wait_for(browser, charted("blog", "canary"), what="blog's canary charted")
        await wait_for(browser, text_of("weight", "100%"), what="blog's weight")
        shown = await asyncio.to_thread(browser.execute_script, CHARTED)
        assert not shown["stable"], shown  # blog's own series: its stable served nothing
        config_text = await asyncio.to_thread(lambda: browser.find_element(By.ID, "config").text)
        assert "canary-weight: 100" in config_text

        await asyncio.to_thread(browser.refresh)  # the choice is in the page's URL
        await wait_for(browser, charted("blog", "canary"), what="blog still charted after a reload")
        assert (await asyncio.to_thread(lambda: browser.current_url)).endswith("/?route=blog")
