"""The driver: hands episodes to Ray workers and writes down each one the moment it finishes.

    plan -> skip what the results file holds -> Ray tasks, at most `workers` at a time
         -> each finished episode: its video written, its line appended, the progress hook called

Why Ray tasks (not actors): a task whose worker process dies (killed, out of memory, a crashed
simulator) is retried by Ray on another worker, up to `WORKER_RETRIES` times, and its ObjectRef
yields one result whatever happened, so every episode is counted once. Worker processes are
reused between tasks, which keeps their simulator and policy warm (see worker.py).

An episode that raises (a policy error, a simulator error) stops the run at once: the episodes
already finished stay in the results file and a rerun of the same command resumes after them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from pi_build import io
from pi_build.errors import PiBuildError
from pi_build.evaluation.cluster import ray_cluster
from pi_build.evaluation.policies import PolicyPlan, ready_policy
from pi_build.evaluation.protocol import Episode
from pi_build.evaluation.results import ResultsFile
from pi_build.evaluation.worker import EpisodeOutcome, WorkerSettings, run_episode_on_worker

WORKER_RETRIES = 3  # how often one episode may lose its worker process before the run stops

EpisodeHook = Callable[[dict[str, Any]], None]


class EvaluationError(PiBuildError, RuntimeError):
    """An episode failed on a worker; the finished episodes are kept for a rerun to resume."""


@dataclasses.dataclass
class RunResult:
    records: list[dict[str, Any]]  # every planned episode exactly once, in plan order
    newly_run: int  # episodes run by this call (the rest came from the results file)
    wall_seconds: float  # this call's time, start to end
    workers: int
    policy: str  # "worker" or "server"


def run_evaluation(
    plan: Sequence[Episode],
    results: ResultsFile,
    policy: PolicyPlan,
    *,
    workers: int,
    address: str | None = None,
    video_dir: Path | None = None,
    video_trials: int = 0,
    assets: Path | None = None,
    on_episode: EpisodeHook | None = None,
    identity: dict[str, Any] | None = None,
) -> RunResult:
    """Runs the episodes of `plan` that `results` does not hold yet, on `workers` Ray workers.

    `identity` says which policy runs (the engines' model and versions); every record carries it,
    and a rerun by another policy into the same results file is refused.

    `on_episode(record)` is called for each episode of the plan: first for those found in the
    results file, then for each new one as it finishes. Nothing is started (no Ray, no policy)
    when every episode is already done.
    """
    started = time.perf_counter()
    done = results.finished(plan, identity)
    for record in done.values():
        _call(on_episode, record)
    todo = [episode for episode in plan if episode.key not in done]
    if todo:
        # The policy first: a wrong server URL fails before a cluster starts.
        with ready_policy(policy, local_cluster=address is None) as source, ray_cluster(workers, address):
            settings = WorkerSettings(policy=source, video_trials=video_trials if video_dir else 0, assets=assets)
            try:
                _run_and_keep(todo, settings, workers, results, video_dir, done, on_episode, identity)
            except EvaluationError as e:
                finished = sum(episode.key in done for episode in plan)
                raise EvaluationError(
                    f"{e}\n{finished} of {len(plan)} episodes are saved in {results.path}; "
                    "fix the cause and rerun the same command to resume"
                ) from None
    return RunResult(
        records=[done[episode.key] for episode in plan],
        newly_run=len(todo),
        wall_seconds=time.perf_counter() - started,
        workers=workers,
        policy=policy.where,
    )


def _run_and_keep(todo: Sequence[Episode], settings: WorkerSettings, workers: int, results: ResultsFile,
                  video_dir: Path | None, done: dict, on_episode: EpisodeHook | None, identity: dict[str, Any] | None) -> None:
    """Runs `todo` on Ray; each finished episode is kept (video, results line) and added to `done`."""
    # closing(): whatever stops the loop (an error, Ctrl-C), the episodes still running are cancelled now.
    with contextlib.closing(_run_on_ray(todo, settings, workers)) as finished_episodes:
        for episode, outcome in finished_episodes:
            if identity is not None:
                outcome.record["engines"] = identity
            done[episode.key] = _keep(outcome, results, video_dir)
            _call(on_episode, done[episode.key])


def _run_on_ray(todo: Sequence[Episode], settings: WorkerSettings, workers: int) -> Iterator[tuple[Episode, EpisodeOutcome]]:
    """Yields (episode, outcome) as episodes finish; keeps at most `workers` of them running.

    Submitting only `workers` tasks at a time (rather than all) keeps the order of the plan
    (task by task, so a worker's simulator is usually reused) and, on a shared cluster, takes
    no more than the workers asked for.
    """
    import ray

    episode_task = ray.remote(num_cpus=1, max_retries=WORKER_RETRIES)(run_episode_on_worker)
    settings_ref = ray.put(settings)  # shipped once, not with every task
    waiting = deque(todo)
    running: dict[Any, Episode] = {}
    try:
        while waiting or running:
            while waiting and len(running) < workers:
                episode = waiting.popleft()
                running[episode_task.remote(episode, settings_ref)] = episode
            [ref], _ = ray.wait(list(running), num_returns=1)
            episode = running.pop(ref)
            yield episode, _get(ref, episode)
    finally:  # an error, or Ctrl-C: stop the episodes still running
        for ref in running:
            ray.cancel(ref, force=True)


def _get(ref: Any, episode: Episode) -> EpisodeOutcome:
    import ray.exceptions

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:  # the episode raised: e.cause is its exception
        cause = e.cause if e.cause is not None else e
        raise EvaluationError(f"{episode.label} failed: {type(cause).__name__}: {_first_line(cause)}") from None
    except ray.exceptions.RayError as e:  # its worker died more often than Ray retries
        raise EvaluationError(f"{episode.label} failed: {type(e).__name__}: {_first_line(e)}") from None


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else "(no message)"


def _keep(outcome: EpisodeOutcome, results: ResultsFile, video_dir: Path | None) -> dict[str, Any]:
    """Writes the episode's video (if any), then appends its record: a line always points at a
    video that exists."""
    record = outcome.record
    if outcome.video is not None and video_dir is not None:
        result = "success" if record["success"] else "failure"
        name = f"{record['suite']}_task{record['task_id']:02d}_trial{record['trial']:02d}_{result}.mp4"
        record["video"] = str(io.atomic_write(Path(video_dir) / name, outcome.video))
    results.append(record)
    return record


def _call(hook: EpisodeHook | None, record: dict[str, Any]) -> None:
    if hook is not None:
        hook(record)

