"""Two demo backends (v1 stable, v2 canary) for the local load test, in one process.

Prints one JSON line ``{"stable": PORT, "canary": PORT}`` once both listen on loopback, then
serves until SIGTERM or SIGINT. Uses the same demo app as ``canary-proxy demo``.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from canary_proxy.demo.apps import DemoApp
from canary_proxy.runner import run_async


async def serve() -> int:
    stable, canary = DemoApp("v1"), DemoApp("v2")
    await stable.start()
    await canary.start()
    stable_port, canary_port = stable.port, canary.port
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(json.dumps({"stable": stable_port, "canary": canary_port}), flush=True)
    try:
        await stop.wait()
    finally:
        await stable.stop()
        await canary.stop()
    return 0


if __name__ == "__main__":
    sys.exit(run_async(serve()))
