"""The README's first command: ``canary-proxy demo`` works with nothing else running."""

from __future__ import annotations

import subprocess
import sys


def test_demo_shows_the_split_stickiness_and_the_qa_header() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "canary_proxy", "demo"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "weight     0%:    0 of 400 new users on canary" in out
    assert "weight   100%:  400 of 400 new users on canary" in out
    assert "QA request with 'X-Canary: always' served by canary" in out
    assert 'canary_proxy_requests_total{code="200",method="GET",version="canary"}' in out
