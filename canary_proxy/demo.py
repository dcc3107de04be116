"""``canary-proxy demo``: two built-in demo apps (v1 stable, v2 canary) behind the real proxy.

Everything runs on loopback and needs nothing else installed. It shows the three routing
rules working: the weight split as the weight rises, sticky users who never flip back, and
a QA header that always reaches the canary.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path

import aiohttp
import yaml
from aiohttp import web

APP_VERSION = web.AppKey("app_version", str)


async def _demo_handler(request: web.Request) -> web.Response:
    version = request.app[APP_VERSION]
    return web.json_response({"app": "demo", "version": version, "path": request.path})


async def start_demo_app(version: str, port: int = 0) -> tuple[web.AppRunner, int]:
    app = web.Application()
    app[APP_VERSION] = version
    app.router.add_route("*", "/{tail:.*}", _demo_handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    return runner, runner.addresses[0][1]


async def _start_proxy(config_path: Path) -> tuple[asyncio.subprocess.Process, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "canary_proxy", "serve", "--config", str(config_path),
        "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--drain-delay", "0",
        "--access-log", "off",
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stderr is not None
    while line := await asyncio.wait_for(process.stderr.readline(), 30):
        entry = json.loads(line)
        if entry.get("msg") == "ready":
            # Keep reading its log, or a full pipe would one day stall the proxy.
            _background.add(asyncio.create_task(_drain(process.stderr)))
            return process, "http://" + entry["public"], "http://" + entry["admin"]
    raise RuntimeError("the proxy exited before it was ready")


_background: set[asyncio.Task[None]] = set()


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.read(65536):
        pass


async def _split(session: aiohttp.ClientSession, url: str, n: int) -> Counter[str]:
    counts: Counter[str] = Counter()
    for _ in range(n):
        async with session.get(url + "/") as r:
            counts[r.headers["X-Canary-Version"]] += 1
            await r.read()
    return counts


async def _set_weight(path: Path, config: dict[str, object], weight: float, admin: str) -> None:
    config["canary-weight"] = weight
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(config))
    os.replace(tmp, path)
    async with aiohttp.ClientSession() as s:
        for _ in range(100):  # the reload lands within ~0.3 s; poll the proxy's own view
            async with s.get(admin + "/config") as r:
                if (await r.json())["canary-weight"] == weight:
                    return
            await asyncio.sleep(0.05)
    raise RuntimeError("the proxy did not pick up the new weight")


async def run_demo(requests_per_step: int = 400) -> int:
    stable_runner, stable_port = await start_demo_app("v1")
    canary_runner, canary_port = await start_demo_app("v2")
    workdir = Path(tempfile.mkdtemp(prefix="canary-proxy-demo-"))
    config: dict[str, object] = {
        "stable-url": f"http://127.0.0.1:{stable_port}",
        "canary-url": f"http://127.0.0.1:{canary_port}",
        "canary-weight": 0,
        "canary-by-header": "X-Canary",
    }
    path = workdir / "canary.yaml"
    path.write_text(yaml.safe_dump(config))
    process, url, admin = await _start_proxy(path)
    print(f"proxy on {url} (admin {admin}); stable v1 :{stable_port}, canary v2 :{canary_port}")
    try:
        async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as anon:
            async with aiohttp.ClientSession() as browser:  # keeps its sticky cookie
                async with browser.get(url + "/") as r:
                    await r.read()
                for weight in (0, 5, 25, 50, 100):
                    await _set_weight(path, config, weight, admin)
                    counts = await _split(anon, url, requests_per_step)
                    share = 100 * counts["canary"] / requests_per_step
                    sticky = (await _split(browser, url, 1)).most_common(1)[0][0]
                    print(
                        f"weight {weight:>5}%: {counts['canary']:>4} of {requests_per_step} new users "
                        f"on canary ({share:5.1f}%); the sticky browser user is on {sticky}"
                    )
            async with anon.get(url + "/", headers={"X-Canary": "always"}) as r:
                print(f"QA request with 'X-Canary: always' served by {r.headers['X-Canary-Version']}")
            async with anon.get(admin + "/metrics") as r:
                lines = [
                    ln for ln in (await r.text()).splitlines() if ln.startswith("canary_proxy_requests_total")
                ]
            print("per-version metrics:\n  " + "\n  ".join(lines))
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        await process.wait()
        await stable_runner.cleanup()
        await canary_runner.cleanup()
    return 0
