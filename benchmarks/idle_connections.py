"""Memory of idle keep-alive client connections: open N, make one request on each, measure.

Reports the RSS of all the proxy's processes (supervisor and workers) before and after.
Usage: .venv/bin/python benchmarks/idle_connections.py [--connections 10000] [--workers 1]
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.conftest import base_config, start_backend, start_proxy, stop_proxy


def rss_mib(pid: int) -> float:
    """VmRSS of the process and all its descendants, in MiB."""
    total = 0
    todo = [pid]
    while todo:
        current = todo.pop()
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
            for task in Path(f"/proc/{current}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except FileNotFoundError:
            continue
    return total / 1024


async def main(connections: int, workers: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, connections + 1000)), hard))
    stable, canary = await start_backend("stable"), await start_backend("canary")
    tmp = Path(tempfile.mkdtemp(prefix="idle-"))
    proxy = await start_proxy(
        base_config(stable, canary), tmp, "--workers", str(workers), "--access-log", "off",
        "--max-connections", str(connections + 100),
    )  # fmt: skip
    port = int(proxy.url.rsplit(":", 1)[1])
    before = rss_mib(proxy.pid)
    opened: list[asyncio.StreamWriter] = []
    for start in range(0, connections, 500):
        batch = await asyncio.gather(
            *(asyncio.open_connection("127.0.0.1", port) for _ in range(min(500, connections - start)))
        )
        for _reader, writer in batch:
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        for reader, writer in batch:
            await reader.readuntil(b"\r\n\r\n")
            opened.append(writer)
    after = rss_mib(proxy.pid)
    print(
        f"{len(opened)} idle keep-alive connections (one request each), --workers {workers}: "
        f"proxy RSS {before:.1f} MiB before, {after:.1f} MiB after "
        f"(+{after - before:.1f} MiB, {1024 * (after - before) / len(opened):.1f} KiB per connection)"
    )
    for writer in opened:
        writer.close()
    await stop_proxy(proxy)
    await stable.stop()
    await canary.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    asyncio.run(main(args.connections, args.workers))
