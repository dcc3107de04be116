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

from canary_proxy.cli import run_async
from canary_proxy.demo import start_demo_app


async def serve() -> int:
    stable, stable_port = await start_demo_app("v1")
    canary, canary_port = await start_demo_app("v2")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(json.dumps({"stable": stable_port, "canary": canary_port}), flush=True)
    try:
        await stop.wait()
    finally:
        await stable.cleanup()
        await canary.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(run_async(serve()))
