"""A rollout's status, shaped once for ``status`` (text and ``-o json``) and the dashboard."""

from __future__ import annotations

import contextlib
import json
from typing import Any

from .analysis import fmt_rate, fmt_seconds
from .plan import Plan, PlanError, describe, parse_plan
from .state import FINAL, RolloutState
from .store import Stored


def status_report(where: str, stored: Stored, state: RolloutState) -> dict[str, Any]:
    plan: Plan | None = None
    with contextlib.suppress(PlanError):
        plan = parse_plan(state.steps) if state.steps else None
    step = describe(plan, state.step).removeprefix("step ") if plan and 0 <= state.step < len(plan) else None
    analysis = None
    with contextlib.suppress(ValueError):
        analysis = json.loads(state.last_analysis) if state.last_analysis else None
    return {
        "store": where,
        "phase": state.phase,
        "final": state.phase in FINAL,
        "steps": state.steps,
        "step": state.step if state.phase else None,
        "stepDescription": step,
        "weight": stored.data.get("canary-weight", 0),
        "total": stored.total,
        "percent": round(stored.percent, 4),
        "message": state.message,
        "consecutiveFailures": state.failures,
        "lastAnalysis": analysis,
        "pendingCommand": state.command,
    }


def format_status(report: dict[str, Any]) -> str:
    lines = [f"{report['store']}: {report['phase'] or 'no rollout recorded'}"]
    if report["phase"]:
        lines.append(f"  step:      {report['stepDescription'] or report['step']}  (steps {report['steps']})")
    lines.append(f"  weight:    {report['weight']} of {report['total']} ({report['percent']:g}%)")
    if report["message"]:
        lines.append(f"  message:   {report['message']}")
    if report["pendingCommand"]:
        lines.append(f"  command:   {report['pendingCommand']} (not yet handled)")
    if analysis := report["lastAnalysis"]:
        lines += _analysis_lines(analysis)
    return "\n".join(lines)


def _analysis_lines(analysis: dict[str, Any]) -> list[str]:
    lines = [f"  analysis:  {analysis.get('result')} at {analysis.get('time')}"]
    for version in ("canary", "stable"):
        if stats := analysis.get(version):
            lines.append(
                f"    {version}: {stats['requests']:g} req, {stats['errors']:g} 5xx "
                f"({fmt_rate(stats['errorRate'])}), p99 {fmt_seconds(stats['p99'])}"
            )
    for check in analysis.get("checks", []):
        show = fmt_seconds if check["name"].startswith("p99") else fmt_rate
        verdict = "ok" if check["ok"] else "FAIL"
        lines.append(f"    {check['name']}: {show(check['value'])} (limit {show(check['limit'])}) {verdict}")
    lines += [f"    {reason}" for reason in analysis.get("reasons", []) if analysis.get("result") != "fail"]
    lines += [f"    {note}" for note in analysis.get("notes", [])]
    return lines
