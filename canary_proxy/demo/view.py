"""What ``canary-proxy demo`` prints: a live ``rich`` view in a terminal, plain lines otherwise.

Both views read the same ``DemoModel`` and are told of each controller event, each analysis
check and, twice a second, a tick. The plain view is for CI logs and pipes: one line per
event or check (the controller's own log line, every number in it) and a traffic summary
every few seconds. With several services every line about one starts with its name, and
the live view has a section per service (its route).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, Protocol, TextIO

from ..rollout.analysis import fmt_rate, fmt_seconds
from ..router import CANARY, STABLE
from .model import CheckRow, DemoModel, ServiceModel

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


def canary_text(model: DemoModel, service: ServiceModel) -> str:
    if service.bad_canary is None:
        return "healthy canary"
    at = model.options.fail_at
    return f"bad canary: v2 starts failing ({service.bad_canary}) once it serves {at:g}% of traffic"


def intro_lines(model: DemoModel) -> list[str]:
    steps = ",".join(map(str, model.plan))
    first = model.services[0]
    if model.several:
        lines = [
            f"canary-proxy demo: {len(model.services)} services behind one proxy, "
            f"each a rollout through {steps} on loopback"
        ]
        lines += [f"  {s.name}: host {s.host}; {canary_text(model, s)}" for s in model.services]
    else:
        lines = [f"canary-proxy demo: a rollout through {steps} on loopback; {canary_text(model, first)}"]
    width = max(len(k) for k in model.urls)
    lines += [f"  {name:<{width}}  {url}" for name, url in model.urls.items()]
    host = f"-H 'Host: {first.host}' " if first.host else ""
    lines.append(
        f"  try: curl -i {host}{model.urls.get('proxy', '')}/   (add -H 'X-Canary: always' for the canary)"
    )
    return lines


def outcome(code: int | None) -> str:
    return {None: "not over", 0: "promoted", 1: "rolled back"}.get(code, f"failed (exit {code})")


def result_text(code: int | None) -> str:
    if code is None:
        return "stopped: every process is shut down"
    return f"result: {'promoted' if code == 0 else 'rolled back'} (exit {code})"


def served_text(service: ServiceModel) -> str:
    """What a service served through the proxy since the start, by version (its metrics)."""
    total = sum(service.served.values())
    parts = ", ".join(f"{service.served.get(v, 0):.0f} by {NAMES[v]}" for v in (STABLE, CANARY))
    return f"{service.name}: {outcome(service.result)}; served {total:.0f} requests ({parts})"


def rate_text(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} req/s"


def weight_text(service: ServiceModel) -> str:
    return "n/a" if service.weight is None else f"{service.weight:g}%"


def summary_line(model: DemoModel, service: ServiceModel) -> str:
    parts = [model.about(service, f"traffic: weight {weight_text(service)}")]
    for version in (STABLE, CANARY):
        v = service.versions[version]
        parts.append(
            f"{NAMES[version]} {rate_text(v.rate)}, {fmt_rate(v.error_rate)} 5xx, p99 {fmt_seconds(v.p99)}"
        )
    users = ", ".join(f"{service.users[v]} on {v}" for v in (STABLE, CANARY))
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
            for service in model.services:
                self._at(model, summary_line(model, service))

    def close(self, model: DemoModel, code: int | None) -> None:
        if model.several and code is not None:
            for service in model.services:
                self._print(served_text(service))
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
        if model.several and code is not None:
            for service in model.services:
                self.console.print(served_text(service), highlight=False)
        self.console.print(result_text(code), style=style, highlight=False)

    def render(self, model: DemoModel) -> RenderableType:
        from rich.console import Group

        if model.several:
            from rich.text import Text

            head = Text(
                f"canary-proxy demo  {model.elapsed:5.1f}s   dashboard {model.urls.get('dashboard', '')}"
            )
            sections = [self._section(model, s) for s in model.services]
            return Group(head, *sections, self._events(model))
        service = model.services[0]
        return Group(
            self._status(model, service, title=f"canary-proxy demo  {model.elapsed:5.1f}s"),
            self._versions(service),
            self._checks(service),
            self._events(model),
        )

    def _section(self, model: DemoModel, service: ServiceModel) -> RenderableType:
        """One service of several: its rollout beside its versions, then its last checks."""
        from rich.columns import Columns
        from rich.console import Group

        top = Columns([self._status(model, service), self._versions(service)], padding=(0, 3))  # wraps
        title = f"{service.name}: host {service.host}"
        return self._panel(Group(top, self._checks(service, rows=4)), title)

    def _panel(self, body: RenderableType, title: str) -> RenderableType:
        from rich.panel import Panel

        return Panel(body, title=title, title_align="left")

    def _status(self, model: DemoModel, service: ServiceModel, *, title: str | None = None) -> RenderableType:
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="dim", justify="right")
        grid.add_column()
        grid.add_row("phase", Text(service.phase, style=PHASE_STYLE.get(service.phase, "bold")))
        grid.add_row("step", service.step)
        bar = Table.grid(padding=(0, 1))
        width = 40 if title is not None else 16
        bar.add_row(ProgressBar(total=100, completed=service.weight or 0, width=width), weight_text(service))
        grid.add_row("canary weight", bar)
        fail_at = model.options.fail_at
        if service.bad_canary is None:
            health = Text("healthy", style="green")
        elif service.fault_active:
            health = Text(f"failing now ({service.bad_canary})", style="bold red")
        else:
            health = Text(f"will fail ({service.bad_canary}) at {fail_at:g}%", style="yellow")
        grid.add_row("canary v2", health)
        if title is None:
            return grid  # a section of several: the dashboard is named once, above them
        grid.add_row("dashboard", model.urls.get("dashboard", ""))
        return self._panel(grid, title)

    def _versions(self, service: ServiceModel) -> RenderableType:
        from rich.table import Table

        table = Table(title="traffic through the proxy (its own metrics, last 3 s)", title_justify="left")
        for name in ("version", "req/s", "5xx", "p50", "p99", "sticky users"):
            table.add_column(name, justify="left" if name == "version" else "right")
        for version, style in ((STABLE, "blue"), (CANARY, "yellow")):
            v = service.versions[version]
            table.add_row(
                f"[{style}]{NAMES[version]}[/]",
                "n/a" if v.rate is None else f"{v.rate:.1f}",
                fmt_rate(v.error_rate),
                fmt_seconds(v.p50),
                fmt_seconds(v.p99),
                str(service.users[version]),
            )
        return table

    def _checks(self, service: ServiceModel, *, rows: int = 8) -> RenderableType:
        from rich.table import Table
        from rich.text import Text

        table = Table(title="analysis (each check of the rollout controller)", title_justify="left")
        for name in ("time", "step", "verdict", "canary", "stable", "why"):
            table.add_column(name, overflow="fold")
        for row in service.checks[-rows:]:
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
