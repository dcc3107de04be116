"""What ``canary-proxy demo`` prints: a live ``rich`` view in a terminal, plain lines otherwise.

Both views read the same ``DemoModel`` and are told of each controller event, each analysis
check and, twice a second, a tick. The plain view is for CI logs and pipes: one line per
event or check (the controller's own log line, every number in it) and a traffic summary
every few seconds.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, Protocol, TextIO

from ..rollout.analysis import fmt_rate, fmt_seconds
from ..router import CANARY, STABLE
from .model import CheckRow, DemoModel

if TYPE_CHECKING:
    from rich.console import RenderableType

SUMMARY_EVERY = 5.0  # seconds between two traffic lines of the plain view
NAMES = {STABLE: "stable v1", CANARY: "canary v2"}


class View(Protocol):
    def start(self, model: DemoModel) -> None: ...
    def event(self, model: DemoModel, text: str, *, warning: bool = False) -> None: ...
    def check(self, model: DemoModel, row: CheckRow) -> None: ...
    def tick(self, model: DemoModel) -> None: ...
    def close(self, model: DemoModel, code: int | None) -> None: ...


def make_view(*, live: bool) -> View:
    return LiveView() if live else PlainView()


def intro_lines(model: DemoModel) -> list[str]:
    o = model.options
    canary = (
        "healthy canary"
        if o.bad_canary is None
        else f"bad canary: v2 starts failing ({o.bad_canary}) once it serves {o.fail_at:g}% of traffic"
    )
    lines = [f"canary-proxy demo: a rollout through {','.join(map(str, model.plan))} on loopback; {canary}"]
    width = max(len(k) for k in model.urls)
    lines += [f"  {name:<{width}}  {url}" for name, url in model.urls.items()]
    lines.append(
        f"  try: curl -i {model.urls.get('proxy', '')}/   (add -H 'X-Canary: always' for the canary)"
    )
    return lines


def result_text(code: int | None) -> str:
    if code is None:
        return "stopped: every process is shut down"
    return f"result: {'promoted' if code == 0 else 'rolled back'} (exit {code})"


def rate_text(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} req/s"


def weight_text(model: DemoModel) -> str:
    return "n/a" if model.weight is None else f"{model.weight:g}%"


def summary_line(model: DemoModel) -> str:
    parts = [f"traffic: weight {weight_text(model)}"]
    for version in (STABLE, CANARY):
        v = model.versions[version]
        parts.append(
            f"{NAMES[version]} {rate_text(v.rate)}, {fmt_rate(v.error_rate)} 5xx, p99 {fmt_seconds(v.p99)}"
        )
    users = ", ".join(f"{model.users[v]} on {v}" for v in (STABLE, CANARY))
    parts.append(f"sticky users: {users}")
    return " | ".join(parts)


class PlainView:
    """Plain progress lines, flushed one by one (a pipe must see them as they happen)."""

    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out or sys.stdout
        self.next_summary = SUMMARY_EVERY

    def _print(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def _at(self, model: DemoModel, text: str) -> None:
        self._print(f"[{model.elapsed:5.1f}s] {text}")

    def start(self, model: DemoModel) -> None:
        for line in intro_lines(model):
            self._print(line)

    def event(self, model: DemoModel, text: str, *, warning: bool = False) -> None:
        self._at(model, text)

    def check(self, model: DemoModel, row: CheckRow) -> None:
        self._at(model, row.line)

    def tick(self, model: DemoModel) -> None:
        if model.elapsed >= self.next_summary:
            self.next_summary = model.elapsed + SUMMARY_EVERY
            self._at(model, summary_line(model))

    def close(self, model: DemoModel, code: int | None) -> None:
        self._print(result_text(code))


PHASE_STYLE = {
    "Progressing": "bold yellow",
    "Paused": "bold",
    "Promoted": "bold green",
    "RolledBack": "bold red",
    "RollingBack": "bold red",
    "Aborted": "bold red",
}
RESULT_STYLE = {"pass": "green", "fail": "bold red", "inconclusive": "dim"}


class LiveView:
    """A live view redrawn in place (``rich.live``), left on screen when the demo ends."""

    def __init__(self) -> None:
        from rich.console import Console

        self.console = Console()
        self.live: Any = None

    def start(self, model: DemoModel) -> None:
        from rich.live import Live

        for line in intro_lines(model):
            self.console.print(line, highlight=False, soft_wrap=True)
        self.live = Live(self.render(model), console=self.console, auto_refresh=False)
        self.live.start()

    def refresh(self, model: DemoModel) -> None:
        if self.live is not None:
            self.live.update(self.render(model), refresh=True)

    def event(self, model: DemoModel, text: str, *, warning: bool = False) -> None:
        self.refresh(model)

    def check(self, model: DemoModel, row: CheckRow) -> None:
        self.refresh(model)

    def tick(self, model: DemoModel) -> None:
        self.refresh(model)

    def close(self, model: DemoModel, code: int | None) -> None:
        if self.live is not None:
            self.refresh(model)
            self.live.stop()
            self.live = None
        style = "dim" if code is None else "bold green" if code == 0 else "bold red"
        self.console.print(result_text(code), style=style, highlight=False)

    def render(self, model: DemoModel) -> RenderableType:
        from rich.console import Group

        return Group(self._status(model), self._versions(model), self._checks(model), self._events(model))

    def _status(self, model: DemoModel) -> RenderableType:
        from rich.panel import Panel
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="dim", justify="right")
        grid.add_column()
        grid.add_row("phase", Text(model.phase, style=PHASE_STYLE.get(model.phase, "bold")))
        grid.add_row("step", model.step)
        bar = Table.grid(padding=(0, 1))
        bar.add_row(ProgressBar(total=100, completed=model.weight or 0, width=40), weight_text(model))
        grid.add_row("canary weight", bar)
        o = model.options
        if o.bad_canary is None:
            health = Text("healthy", style="green")
        elif model.fault_active:
            health = Text(f"failing now ({o.bad_canary})", style="bold red")
        else:
            health = Text(f"will fail ({o.bad_canary}) at {o.fail_at:g}%", style="yellow")
        grid.add_row("canary v2", health)
        grid.add_row("dashboard", model.urls.get("dashboard", ""))
        return Panel(grid, title=f"canary-proxy demo  {model.elapsed:5.1f}s", title_align="left")

    def _versions(self, model: DemoModel) -> RenderableType:
        from rich.table import Table

        table = Table(title="traffic through the proxy (its own metrics, last 3 s)", title_justify="left")
        for name in ("version", "req/s", "5xx", "p50", "p99", "sticky users"):
            table.add_column(name, justify="left" if name == "version" else "right")
        for version, style in ((STABLE, "blue"), (CANARY, "yellow")):
            v = model.versions[version]
            table.add_row(
                f"[{style}]{NAMES[version]}[/]",
                "n/a" if v.rate is None else f"{v.rate:.1f}",
                fmt_rate(v.error_rate),
                fmt_seconds(v.p50),
                fmt_seconds(v.p99),
                str(model.users[version]),
            )
        return table

    def _checks(self, model: DemoModel) -> RenderableType:
        from rich.table import Table
        from rich.text import Text

        table = Table(title="analysis (each check of the rollout controller)", title_justify="left")
        for name in ("time", "step", "verdict", "canary", "stable", "why"):
            table.add_column(name, overflow="fold")
        for row in model.checks[-8:]:
            why = "; ".join(row.reasons) if row.reasons else "every limit holds"
            table.add_row(
                f"{row.elapsed:5.1f}s",
                row.step,
                Text(row.result, style=RESULT_STYLE.get(row.result, "")),
                _stats_text(row.canary),
                _stats_text(row.stable),
                why,
            )
        return table

    def _events(self, model: DemoModel) -> RenderableType:
        from rich.table import Table
        from rich.text import Text

        table = Table.grid(padding=(0, 1))
        table.add_column(style="dim", justify="right")
        table.add_column()
        for elapsed, text, warning in model.events[-6:]:
            table.add_row(f"{elapsed:5.1f}s", Text(text, style="red" if warning else ""))
        return table


def _stats_text(stats: dict[str, Any]) -> str:
    if not stats:
        return "-"
    return (
        f"{stats.get('requests', 0):.0f} req, {fmt_rate(stats.get('errorRate'))} 5xx, "
        f"p99 {fmt_seconds(stats.get('p99'))}"
    )
