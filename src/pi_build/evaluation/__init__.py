"""LIBERO evaluation at scale: the paper protocol, episodes run in parallel on Ray.

    protocol.py  what to run: the paper protocol, the episodes of a run (plan_episodes)
    cluster.py   a local Ray cluster, or joining one at --address
    policies.py  where the policy runs: in each worker, or behind one websocket policy server
    worker.py    one episode on a worker (the Ray task's body); the worker's simulator and policy
    driver.py    hands episodes to workers, appends each finished one to the results file
    results.py   the results file (JSON lines): what a rerun skips
    report.py    success rates with Wilson intervals, latency, lengths: JSON and rich tables
    stats.py     the Wilson interval

`pi-run libero` (cli/run.py) puts them together; `run_evaluation` is the same from Python.
"""

from pi_build.evaluation.driver import EvaluationError, RunResult, run_evaluation
from pi_build.evaluation.policies import InWorkerPolicy, LocalServer, ServerPolicy
from pi_build.evaluation.protocol import PAPER_SUITES, Episode, plan_episodes
from pi_build.evaluation.report import build_report, print_report
from pi_build.evaluation.results import ResultsFile, episodes_path
from pi_build.evaluation.stats import wilson_interval

__all__ = [
    "PAPER_SUITES",
    "Episode",
    "EvaluationError",
    "InWorkerPolicy",
    "LocalServer",
    "ResultsFile",
    "RunResult",
    "ServerPolicy",
    "build_report",
    "episodes_path",
    "plan_episodes",
    "print_report",
    "run_evaluation",
    "wilson_interval",
]
