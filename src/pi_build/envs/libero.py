"""Closed-loop evaluation on the LIBERO benchmark, following openpi's examples/libero/main.py.

The protocol (see shared/design/PI0-FACTS.md): each episode resets the env to one of the suite's
fixed initial states, sends a do-nothing action for `num_wait` steps while objects settle, then asks
the policy for an action chunk whenever the plan is empty and executes its first `replan_steps`
actions. The policy sees the openpi LIBERO request dict (`libero_request`). Success means the env
reported done before the suite's step budget ran out.

LIBERO needs set-up before its first import (a config file, the asset folder, a headless GL
backend); every public function here calls `setup_libero()` first, so callers need not.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import importlib.util
import math
import os
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pi_build.io import atomic_path, atomic_write
from pi_build.spec import Camera
from pi_build.transforms.libero import CAMERA_KEYS, PROMPT_KEY, STATE_KEY, libero_camera_image

# Step budget per suite (policy-driven steps, wait steps not counted): openpi's values, a little
# above the longest training demonstration of each suite.
SUITES: dict[str, int] = {
    "libero_spatial": 220,
    "libero_object": 280,
    "libero_goal": 300,
    "libero_10": 520,
    "libero_90": 400,
}
ENV_RESOLUTION = 256  # LIBERO's training data was rendered at 256x256
MODEL_IMAGE_SIZE = 224
# Zero motion, gripper open: sent while the dropped objects settle.
WAIT_ACTION = [0.0] * 6 + [-1.0]

Policy = Callable[[dict[str, Any]], np.ndarray]

_REPO_ROOT = Path(__file__).resolve().parents[3]
_DEFAULT_ASSETS = _REPO_ROOT.parent / "shared" / "libero" / "assets"
_INSTALL_HINT = "run `bash scripts/install_libero.sh <python>` from the pi-build checkout"
_assets_in_use: Path | None = None


# ---------------------------------------------------------------------------------------------
# Set-up


def _find_assets(assets_dir: Path | None) -> Path:
    if assets_dir is not None:
        source = "the assets_dir argument"
    elif os.environ.get("PI_BUILD_LIBERO_ASSETS"):
        assets_dir, source = Path(os.environ["PI_BUILD_LIBERO_ASSETS"]), "PI_BUILD_LIBERO_ASSETS"
    else:
        assets_dir, source = _DEFAULT_ASSETS, "the default location next to the repository"
    assets_dir = Path(assets_dir).expanduser().resolve()
    # Every LIBERO scene includes files under scenes/; a folder without it is not the asset tree.
    if not (assets_dir / "scenes").is_dir():
        raise FileNotFoundError(
            f"LIBERO assets not found at {assets_dir} (from {source}): expected the LIBERO asset "
            "tree (with a scenes/ folder). Pass assets_dir or set PI_BUILD_LIBERO_ASSETS."
        )
    return assets_dir


def _can_load(*library_names: str) -> bool:
    for name in library_names:
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            pass
    return False


def _choose_gl_backend() -> None:
    """Headless rendering: EGL when its library loads, else OSMesa. A backend the user chose wins.

    Must run before mujoco/robosuite are imported: both read MUJOCO_GL at import time.
    """
    if "MUJOCO_GL" not in os.environ:
        if _can_load("libEGL.so.1"):
            os.environ["MUJOCO_GL"] = "egl"
        elif _can_load("libOSMesa.so.8", "libOSMesa.so.6", "libOSMesa.so"):
            os.environ["MUJOCO_GL"] = "osmesa"
        else:
            raise RuntimeError(
                "No headless OpenGL library found for LIBERO rendering: install Debian's libegl1 "
                f"libegl-mesa0 libgl1-mesa-dri libgl1 (or libosmesa6); {_INSTALL_HINT} does so."
            )
    os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])


def _write_libero_config(package_dir: Path, assets: Path) -> Path:
    """Writes LIBERO's config.yaml (without it, `import libero.libero` prompts on stdin)."""
    import yaml

    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pi-build" / "libero"
    cache.mkdir(parents=True, exist_ok=True)
    benchmark_root = package_dir / "libero"
    config = {
        "benchmark_root": str(benchmark_root),
        "bddl_files": str(benchmark_root / "bddl_files"),
        "init_states": str(benchmark_root / "init_files"),
        "datasets": str(cache / "datasets"),  # demonstrations: never read during evaluation
        "assets": str(assets),
    }
    atomic_write(cache / "config.yaml", yaml.safe_dump(config))
    return cache


def setup_libero(assets_dir: Path | None = None) -> Path:
    """Prepares LIBERO to run headless and offline; returns the asset folder in use.

    Assets come from `assets_dir`, else $PI_BUILD_LIBERO_ASSETS, else ../shared/libero/assets
    beside the repository. Safe to call again; a different assets_dir re-points LIBERO.
    """
    global _assets_in_use
    assets = _find_assets(assets_dir)
    if _assets_in_use == assets:
        return assets
    spec = importlib.util.find_spec("libero")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"LIBERO is not installed in {sys.executable}: {_INSTALL_HINT}.")
    _choose_gl_backend()
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["WANDB_MODE"] = "disabled"
    config_dir = _write_libero_config(Path(list(spec.submodule_search_locations)[0]), assets)
    os.environ["LIBERO_CONFIG_PATH"] = str(config_dir)

    import libero.libero as libero_pkg

    # If LIBERO was imported before us, it read another config path: point it at ours.
    libero_pkg.config_file = str(config_dir / "config.yaml")
    # Scenes find assets through this cache, not config.yaml; unset, LIBERO tries a hub download.
    libero_pkg._assets_path_cache = str(assets)
    _assets_in_use = assets
    return assets


# ---------------------------------------------------------------------------------------------
# Suites, tasks, envs


@functools.lru_cache(maxsize=None)  # building a benchmark re-reads its task files
def _suite(suite: str):
    if suite not in SUITES:
        raise ValueError(f"Unknown LIBERO suite {suite!r}; expected one of {sorted(SUITES)}")
    if _assets_in_use is None:  # keep an earlier setup_libero(assets_dir)
        setup_libero()
    try:
        from libero.libero import benchmark
    except ModuleNotFoundError as e:
        if e.name != "torch":
            raise
        raise ModuleNotFoundError(
            "LIBERO's benchmark module imports torch (it reads the initial states with torch.load); "
            "install pi-build's CPU torch into this Python first", name="torch"
        ) from e

    return benchmark.get_benchmark_dict()[suite]()


def _suite_with_task(suite: str, task_id: int):
    bench = _suite(suite)
    if not 0 <= task_id < bench.n_tasks:
        raise ValueError(f"task_id {task_id} out of range for {suite} ({bench.n_tasks} tasks)")
    return bench


def list_tasks(suite: str) -> list[str]:
    """The language instruction of each task of `suite`, indexed by task id."""
    bench = _suite(suite)
    return [bench.get_task(i).language for i in range(bench.n_tasks)]


def initial_states(suite: str, task_id: int) -> np.ndarray:
    """The suite's fixed initial simulator states for one task, [num_states, state_dim]."""
    bench = _suite_with_task(suite, task_id)
    return np.asarray(bench.get_task_init_states(task_id))


def make_env(suite: str, task_id: int, resolution: int = ENV_RESOLUTION, seed: int = 7):
    """Creates the off-screen env of one task. Call env.close() when done (EGL errors otherwise)."""
    bench = _suite_with_task(suite, task_id)
    from libero.libero.envs import OffScreenRenderEnv

    bddl_file = Path(bench.get_task_bddl_file_path(task_id))
    env = OffScreenRenderEnv(
        bddl_file_name=str(bddl_file), camera_heights=resolution, camera_widths=resolution
    )
    # openpi: the seed changes object placement even when a fixed initial state is set afterwards.
    env.seed(seed)
    return env


# The simulator's camera observations, by the model camera each one feeds (LIBERO has no right wrist).
SIM_CAMERAS = {Camera.BASE: "agentview_image", Camera.LEFT_WRIST: "robot0_eye_in_hand_image"}


def render_only_when_read(env) -> Callable[[bool], None]:
    """Lets the caller say, before each env.step, whether that step's camera images will be read;
    returns that switch. Rendering is ~88% of a LIBERO step on a CPU (about 250 of 286 ms, two
    cameras at 256x256) and openpi's protocol reads the images once per 5 steps.

    robosuite samples each camera at the first physics substep of a control step. The switch keeps
    that timing and only skips the render itself when off (the sensor returns its last image, which
    nobody reads), so the images that are read are the same bits as without it. Install it after
    each env.reset(): a hard reset replaces the sensors. A non-robosuite env gets a no-op switch.
    """
    inner = env
    for _ in range(3):  # our wrappers -> LIBERO's OffScreenRenderEnv -> the robosuite env
        if hasattr(inner, "_observables"):
            break
        inner = getattr(inner, "env", None)
    observables = getattr(inner, "_observables", None) or {}
    wanted = {"render": True}
    for name in SIM_CAMERAS.values():
        if name not in observables:
            continue
        # robosuite 1.4 (LIBERO's pin) has no public getter for an observable's sensor.
        render = getattr(observables[name]._sensor, "renders", observables[name]._sensor)
        kept: dict[str, Any] = {}

        def sensor(obs_cache, render=render, kept=kept):
            if wanted["render"] or "image" not in kept:
                kept["image"] = render(obs_cache)
            return kept["image"]

        sensor.__modality__, sensor.renders = render.__modality__, render
        inner.modify_observable(name, "sensor", sensor)
    return lambda on: wanted.__setitem__("render", bool(on))


# ---------------------------------------------------------------------------------------------
# Observation for the policy


def quat2axisangle(quat: np.ndarray) -> np.ndarray:
    """Axis-angle (axis * angle, radians) of an (x, y, z, w) quaternion, as robosuite computes it.

    A quaternion with w = +-1 (zero rotation) gives zeros; w is clipped to [-1, 1] first because
    the simulator's quaternions can drift just past it.
    """
    quat = np.asarray(quat, dtype=np.float64)
    if quat.shape != (4,):
        raise ValueError(f"quaternion must have shape (4,), got {quat.shape}")
    w = min(max(quat[3], -1.0), 1.0)
    sin_half = math.sqrt(1.0 - w * w)
    if sin_half == 0.0:
        return np.zeros(3)
    # This order of operations gives the same bits as robosuite and openpi's example.
    return quat[:3] * 2.0 * math.acos(w) / sin_half


def model_image(env_image: np.ndarray) -> np.ndarray:
    """A LIBERO camera image as the policy sees it: rotated 180 degrees (LIBERO renders upside
    down relative to the training data), then resized with padding to 224x224, uint8."""
    return libero_camera_image(env_image, MODEL_IMAGE_SIZE)


def libero_request(obs: dict[str, np.ndarray], task_description: str) -> dict[str, Any]:
    """The openpi LIBERO request dict for one env observation (what openpi's client sends)."""
    for key in (*SIM_CAMERAS.values(), "robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos"):
        if key not in obs:
            raise KeyError(f"LIBERO observation lacks {key!r}; has {sorted(obs)}")
    state = np.concatenate(
        [obs["robot0_eef_pos"], quat2axisangle(obs["robot0_eef_quat"]), obs["robot0_gripper_qpos"]]
    )
    return {
        **{CAMERA_KEYS[camera]: model_image(obs[name]) for camera, name in SIM_CAMERAS.items()},
        STATE_KEY: state,  # float64, 8 values, as openpi sends it
        PROMPT_KEY: str(task_description),
    }


# ---------------------------------------------------------------------------------------------
# Episodes and evaluation


@dataclasses.dataclass
class EpisodeResult:
    success: bool
    steps: int  # env steps driven by the policy (the wait steps are not counted)
    policy_calls: int
    policy_seconds: float  # time spent inside the policy
    env_seconds: float  # time spent stepping and rendering the simulator
    video_path: Path | None = None  # set by evaluate() when it writes a video


def _check_chunk(chunk: Any, replan_steps: int) -> np.ndarray:
    chunk = np.asarray(chunk)
    if chunk.ndim != 2 or chunk.shape[1] < 7 or chunk.shape[0] < replan_steps:
        raise ValueError(
            f"policy must return an action chunk [H >= replan_steps={replan_steps}, >= 7], "
            f"got shape {chunk.shape}"
        )
    if not np.isfinite(chunk[:replan_steps, :7]).all():
        raise ValueError("policy returned non-finite actions")
    return chunk


def run_episode(
    env,
    policy: Policy,
    *,
    task_description: str,
    initial_state: np.ndarray,
    max_steps: int,
    replan_steps: int = 5,
    num_wait: int = 10,
    video_frames: list[np.ndarray] | None = None,
    render_every_step: bool = False,
) -> EpisodeResult:
    """Runs one episode from `initial_state` with openpi's protocol.

    `policy(request) -> actions [H, >= 7]`; the first 7 dims of the first `replan_steps` rows are
    executed before the policy is asked again. `video_frames`, when given, receives the policy's
    base image (224x224, uint8) at every policy-driven step, like openpi's replay videos.
    The cameras render only at the steps whose images are read (``render_only_when_read``; the
    same observations, ~3x fewer simulator seconds on a CPU) unless ``render_every_step``.
    Errors from the policy or the simulator propagate (openpi logs them and counts a failure).
    """
    if replan_steps < 1 or max_steps < 0 or num_wait < 0:
        raise ValueError(f"bad episode settings: {replan_steps=} {max_steps=} {num_wait=}")
    policy_seconds = env_seconds = 0.0
    start = time.perf_counter()
    env.reset()
    render = (lambda on: None) if render_every_step else render_only_when_read(env)
    render(num_wait == 0)
    obs = env.set_init_state(initial_state)
    for i in range(num_wait):  # the simulator drops the objects at the start; let them land
        render(i == num_wait - 1)  # the first policy call reads the last wait step's images
        obs, _, _, _ = env.step(WAIT_ACTION)
    env_seconds += time.perf_counter() - start

    plan: deque[np.ndarray] = deque()
    policy_calls = steps = 0
    done = False
    while steps < max_steps:
        if video_frames is not None:
            video_frames.append(model_image(obs[SIM_CAMERAS[Camera.BASE]]))
        if not plan:
            request = libero_request(obs, task_description)
            start = time.perf_counter()
            chunk = _check_chunk(policy(request), replan_steps)
            policy_seconds += time.perf_counter() - start
            policy_calls += 1
            plan.extend(chunk[:replan_steps, :7])
        render(video_frames is not None or len(plan) == 1)  # read next: by the video, or the policy
        start = time.perf_counter()
        obs, _, done, _ = env.step(plan.popleft().tolist())
        env_seconds += time.perf_counter() - start
        steps += 1
        if done:
            break
    return EpisodeResult(
        success=bool(done),
        steps=steps,
        policy_calls=policy_calls,
        policy_seconds=policy_seconds,
        env_seconds=env_seconds,
    )


@dataclasses.dataclass
class TaskResult:
    task_id: int
    description: str
    episodes: list[EpisodeResult]

    @property
    def success_rate(self) -> float:
        return sum(e.success for e in self.episodes) / max(len(self.episodes), 1)


@dataclasses.dataclass
class EvalResult:
    suite: str
    max_steps: int
    tasks: list[TaskResult]

    @property
    def episodes(self) -> int:
        return sum(len(t.episodes) for t in self.tasks)

    @property
    def successes(self) -> int:
        return sum(e.success for t in self.tasks for e in t.episodes)

    @property
    def success_rate(self) -> float:
        return self.successes / max(self.episodes, 1)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary: overall and per-task success, every episode's numbers."""

        def episode(e: EpisodeResult) -> dict[str, Any]:
            d = dataclasses.asdict(e)
            d["video_path"] = str(e.video_path) if e.video_path else None
            return d

        return {
            "suite": self.suite,
            "max_steps": self.max_steps,
            "episodes": self.episodes,
            "successes": self.successes,
            "success_rate": self.success_rate,
            "tasks": [
                {
                    "task_id": t.task_id,
                    "description": t.description,
                    "success_rate": t.success_rate,
                    "episodes": [episode(e) for e in t.episodes],
                }
                for t in self.tasks
            ],
        }


# Called after each episode with (task_id, trial, result): hook for a progress bar or a log.
ProgressHook = Callable[[int, int, EpisodeResult], None]


def _write_video(path: Path, frames: list[np.ndarray], fps: int = 10) -> None:
    import imageio

    with atomic_path(path) as tmp:
        imageio.mimwrite(tmp, frames, fps=fps)


def evaluate(
    suite: str,
    task_ids: list[int] | None,
    trials: int,
    policy: Policy,
    *,
    max_steps: int | None = None,
    seed: int = 7,
    video_dir: Path | None = None,
    progress: ProgressHook | None = None,
    replan_steps: int = 5,
    num_wait: int = 10,
) -> EvalResult:
    """Runs `trials` episodes of each task (all tasks when task_ids is None); trial i starts from
    the suite's initial state i. `max_steps` caps the suite's step budget (for quick runs).
    With `video_dir`, writes one MP4 per episode of the policy's base camera view."""
    budget = SUITES.get(suite)
    if budget is None:
        raise ValueError(f"Unknown LIBERO suite {suite!r}; expected one of {sorted(SUITES)}")
    if max_steps is not None:
        budget = min(budget, max_steps)
    descriptions = list_tasks(suite)
    task_ids = list(range(len(descriptions))) if task_ids is None else list(task_ids)
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    if video_dir is not None:
        video_dir = Path(video_dir)
        video_dir.mkdir(parents=True, exist_ok=True)
    # Check every task before the first (slow) episode runs.
    states_of = {task_id: initial_states(suite, task_id) for task_id in task_ids}
    for task_id, states in states_of.items():
        if trials > len(states):
            raise ValueError(
                f"{suite} task {task_id} has {len(states)} initial states; {trials} trials asked"
            )

    # openpi seeds numpy's global generator once per run; robosuite draws from it on reset.
    np.random.seed(seed)
    tasks = []
    for task_id in task_ids:
        env = make_env(suite, task_id, seed=seed)
        episodes = []
        try:
            for trial in range(trials):
                frames: list[np.ndarray] | None = [] if video_dir is not None else None
                result = run_episode(
                    env,
                    policy,
                    task_description=descriptions[task_id],
                    initial_state=states_of[task_id][trial],
                    max_steps=budget,
                    replan_steps=replan_steps,
                    num_wait=num_wait,
                    video_frames=frames,
                )
                if video_dir is not None and frames:
                    outcome = "success" if result.success else "failure"
                    result.video_path = video_dir / f"{suite}_task{task_id:02d}_trial{trial:02d}_{outcome}.mp4"
                    _write_video(result.video_path, frames)
                episodes.append(result)
                if progress is not None:
                    progress(task_id, trial, result)
        finally:
            env.close()
        tasks.append(TaskResult(task_id=task_id, description=descriptions[task_id], episodes=episodes))
    return EvalResult(suite=suite, max_steps=budget, tasks=tasks)
