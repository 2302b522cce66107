"""The report of a run: success per task and per suite with 95% Wilson intervals, episode
lengths, policy latency, wall time; as a JSON-ready dict and as rich tables."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from pi_build.evaluation.driver import RunResult
from pi_build.evaluation.protocol import NUM_WAIT_STEPS, REPLAN_STEPS
from pi_build.evaluation.stats import wilson_interval
from pi_build.runtime.timing import summarize

LATENCY_KEYS = ("call_ms", "infer_ms")


def success_summary(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Trials, successes, the success rate and its 95% Wilson interval."""
    trials, successes = len(records), sum(bool(r["success"]) for r in records)
    low, high = wilson_interval(successes, trials)
    return {"trials": trials, "successes": successes, "success_rate": successes / trials if trials else 0.0,
            "ci95": [low, high]}


def _group(records: Sequence[dict[str, Any]], *fields: str) -> dict[tuple, list[dict[str, Any]]]:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for record in records:  # dicts keep the order in which groups first appear: the plan's
        groups.setdefault(tuple(record[f] for f in fields), []).append(record)
    return groups


def _episode_entry(record: dict[str, Any]) -> dict[str, Any]:
    """An episode in the report: its record without the per-call latencies (the results file has them)."""
    return {key: value for key, value in record.items() if key != "latency_ms"}


def build_report(run: RunResult, *, results_file: Path, seed: int) -> dict[str, Any]:
    records = run.records
    tasks = [
        {
            "suite": suite,
            "task_id": task_id,
            "description": episodes[0]["description"],
            **success_summary(episodes),
            "steps": summarize([e["steps"] for e in episodes]),
            "episodes": [_episode_entry(e) for e in episodes],
        }
        for (suite, task_id), episodes in _group(records, "suite", "task_id").items()
    ]
    suites = [
        {
            "suite": suite,
            "max_steps": episodes[0]["max_steps"],
            "tasks": len(_group(episodes, "task_id")),
            **success_summary(episodes),
            "steps": summarize([e["steps"] for e in episodes]),
        }
        for (suite,), episodes in _group(records, "suite").items()
    ]
    return {
        "protocol": {"replan_steps": REPLAN_STEPS, "num_wait": NUM_WAIT_STEPS, "seed": seed},
        "episodes": len(records),
        **success_summary(records),
        "suites": suites,
        "tasks": tasks,
        "episode_steps": summarize([r["steps"] for r in records]),
        "successful_episode_steps": summarize([r["steps"] for r in records if r["success"]]),
        "latency_ms": {key: summarize([ms for r in records for ms in r["latency_ms"][key]]) for key in LATENCY_KEYS},
        "wall_seconds": run.wall_seconds,
        "workers": run.workers,
        "policy": run.policy,
        "newly_run": run.newly_run,
        "resumed": len(records) - run.newly_run,
        "results_file": str(results_file),
        "videos": [r["video"] for r in records if r.get("video")],
    }


def _rate(summary: dict[str, Any]) -> tuple[str, str, str]:
    low, high = summary["ci95"]
    return f"{summary['successes']}/{summary['trials']}", f"{summary['success_rate']:.1%}", f"{low:.1%} - {high:.1%}"


def _mean_steps(steps: dict[str, Any]) -> str:
    return f"{steps['mean']:.0f}" if steps["count"] else "-"


def success_table(report: dict[str, Any]) -> Table:
    table = Table(title="LIBERO success (95% Wilson interval)")
    for column in ("suite", "task", "description", "success", "rate", "95% interval", "mean steps"):
        table.add_column(column, justify="left" if column in ("suite", "description") else "right")
    for suite in report["suites"]:
        for task in (t for t in report["tasks"] if t["suite"] == suite["suite"]):
            table.add_row(task["suite"], str(task["task_id"]), task["description"], *_rate(task), _mean_steps(task["steps"]))
        table.add_row(suite["suite"], "all", f"{suite['tasks']} tasks, max {suite['max_steps']} steps", *_rate(suite),
                      _mean_steps(suite["steps"]), style="bold", end_section=True)
    if len(report["suites"]) > 1:
        table.add_row("all suites", "", "", *_rate(report), _mean_steps(report["episode_steps"]), style="bold")
    return table


def latency_table(report: dict[str, Any]) -> Table:
    table = Table(title=f"policy latency (ms; policy in the {report['policy']})")
    for column in ("", "count", "mean", "p50", "p90", "p99", "max"):
        table.add_column(column, justify="right")
    labels = {"call_ms": "call_ms (as the simulator waits)", "infer_ms": "infer_ms (inside the policy)"}
    for key, stats in report["latency_ms"].items():
        values = [f"{stats[k]:.1f}" for k in ("mean", "p50", "p90", "p99", "max")] if stats["count"] else ["-"] * 5
        table.add_row(labels[key], str(stats["count"]), *values)
    return table


def print_report(report: dict[str, Any], console: Console) -> None:
    console.print(success_table(report))
    console.print(latency_table(report))
    console.print(
        f"{report['episodes']} episodes ({report['newly_run']} run now, {report['resumed']} from the results file) "
        f"in {report['wall_seconds']:.1f} s on {report['workers']} worker(s); episode steps: mean "
        f"{_mean_steps(report['episode_steps'])}"
    )
    if report["videos"]:
        console.print(f"videos: {len(report['videos'])} in {Path(report['videos'][0]).parent}")
