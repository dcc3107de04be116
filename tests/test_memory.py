"""The malloc tuning (memory.py), measured as what it is for: page faults per relayed buffer."""

from __future__ import annotations

import json
import os
import subprocess
import sys

# As one loop iteration relays a body chunk for each of 16 connections: 16 reads of 256 KiB
# (a socket read's size) arrive, are written on, and are freed together; 25 iterations.
# Report whether tuning applied and the minor page faults the 400 buffers cost.
PROBE = """
import json, resource, sys
from canary_proxy.memory import tune_malloc
tuned = tune_malloc() if sys.argv[1] == "tune" else False
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(25):
    batch = [b"x" * (256 << 10) for _ in range(16)]
    del batch
after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
print(json.dumps({"tuned": tuned, "faults": after - before}))
"""


def probe(mode: str, env: dict[str, str] | None = None) -> dict[str, object]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    result = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
        env={**clean, **(env or {})}, timeout=30,
    )  # fmt: skip
    return dict(json.loads(result.stdout))


def test_tuned_malloc_reuses_body_buffers_instead_of_faulting_them_in() -> None:
    untuned, tuned = probe("plain"), probe("tune")
    assert tuned["tuned"] is True  # Debian's glibc has mallopt
    # Untuned, every buffer's 64 pages are faulted in anew: about 25,600 for 400 (measured
    # 24,853). Tuned, only the first batch's 1,024 pages are; later batches reuse them. The
    # bounds sit halfway to the other case, with room for the interpreter's own allocations.
    assert isinstance(untuned["faults"], int) and untuned["faults"] > 400 * 32, untuned
    assert isinstance(tuned["faults"], int) and tuned["faults"] < 16 * 64 + 600, tuned


def test_the_users_own_malloc_settings_win() -> None:
    assert probe("tune", {"MALLOC_MMAP_THRESHOLD_": "131072"})["tuned"] is False
