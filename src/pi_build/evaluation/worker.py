"""What a worker process does for one episode: the body of the Ray task.

A worker process runs many episodes one after another, so it keeps what is slow to make between
them: the simulator of the task it ran last (creating a LIBERO env takes seconds) and the loaded
policy or server connection. Both live in this module's globals, one per worker process.

The worker writes no files: it returns the episode's record (and its video, encoded in memory) to
the driver, which alone writes the results. That keeps the results file single-writer and lets
workers on other machines take part without a shared disk.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from pi_build.envs import libero
from pi_build.evaluation.policies import PolicyFn, PolicySource
from pi_build.evaluation.protocol import NUM_WAIT_STEPS, REPLAN_STEPS, Episode

VIDEO_FPS = 10  # as envs/libero's per-episode videos

# The per-process caches: {"task": (suite, task_id), "env": env} and {cache_key: policy}.
_simulator: dict[str, Any] = {}
_policies: dict[str, PolicyFn] = {}


@dataclasses.dataclass(frozen=True)
class WorkerSettings:
    """What every episode of a run shares; shipped to the workers with each episode."""

    policy: PolicySource
    video_trials: int = 0  # record the videos of trials 0 .. video_trials - 1 of each task
    assets: Path | None = None  # LIBERO asset folder; None: envs/libero's default lookup
    replan_steps: int = REPLAN_STEPS
    num_wait: int = NUM_WAIT_STEPS


@dataclasses.dataclass
class EpisodeOutcome:
    record: dict[str, Any]  # one line of the results file
    video: bytes | None  # an MP4 of the policy's base camera, when this trial is filmed


class TimedPolicy:
    """Calls the policy for the episode loop and keeps each call's latency.

    `call_ms` is the whole call as the simulator waits for it (with the network, for a server);
    `infer_ms` is the time inside the policy, as the policy (or its server) reports it.
    """

    def __init__(self, policy: PolicyFn):
        self.policy = policy
        self.call_ms: list[float] = []
        self.infer_ms: list[float] = []

    def __call__(self, request: dict[str, Any]) -> np.ndarray:
        start = time.perf_counter()
        reply = self.policy(request)
        self.call_ms.append((time.perf_counter() - start) * 1e3)
        infer_ms = _reported_infer_ms(reply)
        if infer_ms is not None:
            self.infer_ms.append(infer_ms)
        return reply["actions"]


def _reported_infer_ms(reply: dict[str, Any]) -> float | None:
    for timing in ("policy_timing", "server_timing"):  # pi-build's Policy first, then any server
        value = (reply.get(timing) or {}).get("infer_ms")
        if value is not None:
            return float(value)
    return None


def run_episode_on_worker(episode: Episode, settings: WorkerSettings) -> EpisodeOutcome:
    """Runs one episode with openpi's protocol; returns its record and, if filmed, its video."""
    libero.setup_libero(settings.assets)
    # The policy before the simulator: loading torch's compiler stack (Triton's LLVM) into a process
    # where the software OpenGL renderer (Mesa's LLVM) is already loaded crashes it (SIGSEGV).
    policy = TimedPolicy(_policy_for(settings.policy))
    env = _simulator_for(episode.suite, episode.task_id)
    seed = episode.simulator_seed()
    env.seed(seed)
    np.random.seed(seed)  # robosuite draws from numpy's global generator on reset
    frames: list[np.ndarray] | None = [] if episode.trial < settings.video_trials else None
    started = time.perf_counter()
    try:
        result = libero.run_episode(
            env,
            policy,
            task_description=libero.list_tasks(episode.suite)[episode.task_id],
            initial_state=libero.initial_states(episode.suite, episode.task_id)[episode.trial],
            max_steps=episode.max_steps,
            replan_steps=settings.replan_steps,
            num_wait=settings.num_wait,
            video_frames=frames,
        )
    except BaseException:
        # The simulator or the connection may be left broken: make fresh ones for the next episode.
        _forget_simulator()
        _forget_policies()
        raise
    record = _episode_record(episode, result, policy, settings, seconds=time.perf_counter() - started)
    return EpisodeOutcome(record, encode_mp4(frames) if frames else None)


def _episode_record(episode: Episode, result: libero.EpisodeResult, policy: TimedPolicy, settings: WorkerSettings, *, seconds: float) -> dict[str, Any]:
    """One line of the results file: the episode's identity, outcome, timings and where it ran."""
    return {
        **dataclasses.asdict(episode),
        "description": libero.list_tasks(episode.suite)[episode.task_id],
        "success": result.success,
        "steps": result.steps,
        "policy_calls": result.policy_calls,
        "policy_seconds": result.policy_seconds,
        "env_seconds": result.env_seconds,
        "episode_seconds": seconds,
        "latency_ms": {"call_ms": policy.call_ms, "infer_ms": policy.infer_ms},
        "policy": settings.policy.where,
        "worker": {"pid": os.getpid(), "node": _node_address()},
        "video": None,  # the driver fills in the path once it has written the file
    }


def encode_mp4(frames: list[np.ndarray], fps: int = VIDEO_FPS) -> bytes:
    """The frames as MP4 bytes, ready for the driver to write (workers write no files)."""
    import imageio.v3 as iio

    return iio.imwrite("<bytes>", np.stack(frames), extension=".mp4", fps=fps)


def _simulator_for(suite: str, task_id: int):
    """This process's env for the task; an env of another task is closed first."""
    if _simulator.get("task") != (suite, task_id):
        _forget_simulator()
        _simulator["env"] = libero.make_env(suite, task_id)
        _simulator["task"] = (suite, task_id)
    return _simulator["env"]


def _forget_simulator() -> None:
    env = _simulator.pop("env", None)
    _simulator.pop("task", None)
    if env is not None:
        env.close()


def _policy_for(source: PolicySource) -> PolicyFn:
    """This process's policy for `source`, loaded (or connected) on first use only."""
    if source.cache_key not in _policies:
        _forget_policies()  # one policy per worker: a new one replaces the old
        _policies[source.cache_key] = source.connect()
    return _policies[source.cache_key]


def _forget_policies() -> None:
    for policy in _policies.values():
        if hasattr(policy, "close"):  # a server connection
            policy.close()
    _policies.clear()


def _node_address() -> str | None:
    try:
        import ray.util

        return ray.util.get_node_ip_address()
    except Exception:  # outside Ray, or its address is unknown: the record just lacks it
        return None


# LIBERO's EGL context errors at interpreter exit unless the env is closed first.
atexit.register(_forget_simulator)
