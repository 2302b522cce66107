"""LIBERO closed-loop evaluation: openpi's episode protocol on the real simulator, the request dict a
policy receives, evaluate()'s results, and the recorded observations shipped as package data."""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pi_build.envs import libero

pytestmark = pytest.mark.libero
needs_libero = pytest.mark.skipif(
    importlib.util.find_spec("libero") is None,
    reason="LIBERO is not installed: run `bash scripts/install_libero.sh .venv/bin/python`",
)
REQUEST_KEYS = {"observation/image", "observation/wrist_image", "observation/state", "prompt"}
SUITE, TASK_ID, MAX_STEPS = "libero_spatial", 0, 15


# --------------------------------------------------------------------------- quat2axisangle


@pytest.mark.parametrize(
    ("quat", "expected"),
    [
        # 90 degrees about z
        ([0.0, 0.0, math.sin(math.pi / 4), math.cos(math.pi / 4)], [0.0, 0.0, math.pi / 2]),
        # 180 degrees about x (w = 0)
        ([1.0, 0.0, 0.0, 0.0], [math.pi, 0.0, 0.0]),
        # 120 degrees about (1, 1, 1) / sqrt(3): axis * 2pi/3
        ([0.5, 0.5, 0.5, 0.5], [2 * math.pi / 3 / math.sqrt(3)] * 3),
        # 1e-6 rad about y: still the exact small rotation, not zeros
        ([0.0, math.sin(5e-7), 0.0, math.cos(5e-7)], [0.0, 1e-6, 0.0]),
        # zero rotation, either sign of w
        ([0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0]),
        ([0.0, 0.0, 0.0, -1.0], [0.0, 0.0, 0.0]),
        # w drifted past 1 by rounding: clipped, so zero rotation (no NaN from sqrt(1 - w^2))
        ([1e-9, 0.0, 0.0, 1.0 + 1e-12], [0.0, 0.0, 0.0]),
    ],
)
def test_quat2axisangle_hand_values(quat, expected):
    given = np.array(quat)
    out = libero.quat2axisangle(given)
    assert out.shape == (3,)
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-12)
    np.testing.assert_array_equal(given, quat)  # the input is not clipped in place


def test_quat2axisangle_round_trip_on_random_rotations():
    rng = np.random.default_rng()
    for _ in range(20):
        q = rng.normal(size=4)
        q /= np.linalg.norm(q)
        q *= np.sign(q[3])  # w >= 0: angle in [0, pi]
        rotvec = libero.quat2axisangle(q)
        angle = np.linalg.norm(rotvec)
        rebuilt = np.concatenate([rotvec / angle * math.sin(angle / 2), [math.cos(angle / 2)]])
        np.testing.assert_allclose(rebuilt, q, atol=1e-9)


def test_quat2axisangle_rejects_wrong_shape():
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        libero.quat2axisangle(np.ones(3))


# --------------------------------------------------------------------------- set-up and package data


def test_setup_libero_names_the_missing_assets_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        libero.setup_libero(tmp_path / "nowhere")


@needs_libero
def test_setup_points_libero_at_the_assets_and_its_task_files():
    assets = libero.setup_libero()
    libero_pkg = importlib.import_module("libero.libero")
    assert libero_pkg.get_assets_path() == str(assets) and (assets / "scenes").is_dir()
    for key in ("bddl_files", "init_states"):
        assert Path(libero_pkg.get_libero_path(key)).is_dir(), key
    assert os.environ["MUJOCO_GL"] in ("egl", "osmesa") and os.environ["HF_HUB_OFFLINE"] == "1"


def test_recorded_observations_are_libero_requests():
    from pi_build.transforms.libero import load_recorded_observations

    observations = load_recorded_observations()
    assert len(observations) == 8
    for obs in observations:
        assert REQUEST_KEYS | {"suite", "task_id"} == set(obs)
        for key in ("observation/image", "observation/wrist_image"):
            assert obs[key].shape == (224, 224, 3) and obs[key].dtype == np.uint8
            assert obs[key].std() > 10, f"{key} looks blank"
        state = obs["observation/state"]
        assert state.shape == (8,) and state.dtype == np.float32 and np.isfinite(state).all()
        assert np.linalg.norm(state[3:6]) <= 2 * math.pi  # an axis-angle rotation (w < 0: past pi)
        assert state[6] == pytest.approx(-state[7], abs=1e-3)  # the two fingers mirror each other
        assert obs["suite"] in libero.SUITES and obs["prompt"].startswith("pick up")
    # Steps 0 and 5 of each recorded episode: the robot moved in between.
    assert not np.allclose(observations[0]["observation/state"], observations[1]["observation/state"])


# --------------------------------------------------------------------------- the real simulator


class RecordingEnv:
    """The real env, keeping each action it was sent and each observation it returned."""

    def __init__(self, env):
        self.env, self.actions, self.observations = env, [], []

    def reset(self):
        self.actions.clear()
        self.observations.clear()
        return self.env.reset()

    def set_init_state(self, state):
        obs = self.env.set_init_state(state)
        self.observations.append({k: np.array(v) for k, v in obs.items()})
        return obs

    def step(self, action):
        self.actions.append(list(action))
        out = self.env.step(action)
        self.observations.append({k: np.array(v) for k, v in out[0].items()})
        return out


@pytest.fixture(scope="module")
def env():
    libero.setup_libero()
    env = libero.make_env(SUITE, TASK_ID)
    yield RecordingEnv(env)
    env.close()


@needs_libero
def test_episode_follows_openpi_protocol(env):
    from robosuite.utils.transform_utils import quat2axisangle as robosuite_quat2axisangle

    rng = np.random.default_rng()
    chunks, requests = [], []

    def policy(request):
        requests.append(request)
        chunk = rng.uniform(-0.2, 0.2, size=(10, 8))  # longer and wider than used: [:5, :7] runs
        chunks.append(chunk)
        return chunk

    description = libero.list_tasks(SUITE)[TASK_ID]
    frames = []
    result = libero.run_episode(
        env,
        policy,
        task_description=description,
        initial_state=libero.initial_states(SUITE, TASK_ID)[0],
        max_steps=MAX_STEPS,
        video_frames=frames,
    )
    assert not result.success and result.steps == MAX_STEPS
    assert result.policy_calls == len(requests) == math.ceil(MAX_STEPS / 5)

    # Ten do-nothing steps with the gripper open, then the first 5 rows (7 dims) of each chunk.
    assert len(env.actions) == 10 + MAX_STEPS
    assert env.actions[:10] == [[0.0] * 6 + [-1.0]] * 10
    executed = np.array(env.actions[10:])
    np.testing.assert_array_equal(executed, np.concatenate([c[:5, :7] for c in chunks])[:MAX_STEPS])

    for call, request in enumerate(requests):
        assert set(request) == REQUEST_KEYS and request["prompt"] == description
        raw = env.observations[10 + 5 * call]  # [0] came from set_init_state, [i] from step i
        for key, camera in [("observation/image", "agentview_image"),
                            ("observation/wrist_image", "robot0_eye_in_hand_image")]:
            image = request[key]
            assert image.shape == (224, 224, 3) and image.dtype == np.uint8
            # 256 -> 224 is a plain bilinear resize (no padding) of the 180-degree rotated render.
            rotated = np.asarray(Image.fromarray(raw[camera][::-1, ::-1]).resize((224, 224), Image.BILINEAR))
            unrotated = np.asarray(Image.fromarray(raw[camera]).resize((224, 224), Image.BILINEAR))
            np.testing.assert_array_equal(image, rotated)
            assert not np.array_equal(image, unrotated)
        state = request["observation/state"]
        assert state.shape == (8,)
        np.testing.assert_array_equal(state[:3], raw["robot0_eef_pos"])
        np.testing.assert_array_equal(state[6:], raw["robot0_gripper_qpos"])
        # robosuite's own conversion (which openpi's example copies) gives the same bits.
        np.testing.assert_array_equal(state[3:6], robosuite_quat2axisangle(raw["robot0_eef_quat"].copy()))

    # The replay video holds the policy's base view at every policy-driven step.
    assert len(frames) == MAX_STEPS
    for call, request in enumerate(requests):
        np.testing.assert_array_equal(frames[5 * call], request["observation/image"])


@needs_libero
def test_cameras_render_only_at_the_steps_whose_images_are_read(env):
    """The same episode with the cameras rendered at every step and only where read: bit-identical
    requests (images and state) and actions; and the switch really skips the renders. Each episode
    runs in a fresh env of the same seed: a reset re-places the objects the initial state does not
    hold, so two episodes of one env differ in their images whatever the rendering."""
    seed = int(np.random.default_rng().integers(2**31))

    def episode(render_every_step: bool) -> tuple[list[dict], list[list[float]]]:
        rng, requests = np.random.default_rng(seed), []

        def policy(request):
            requests.append(request)
            return rng.uniform(-0.3, 0.3, size=(10, 7))

        fresh = RecordingEnv(libero.make_env(SUITE, TASK_ID))
        try:
            libero.run_episode(fresh, policy, task_description="x", initial_state=libero.initial_states(SUITE, TASK_ID)[1],
                               max_steps=MAX_STEPS, num_wait=4, render_every_step=render_every_step)
        finally:
            fresh.env.close()
        return requests, [list(a) for a in fresh.actions]

    every, every_actions = episode(True)
    lazy, lazy_actions = episode(False)
    assert lazy_actions == every_actions and len(lazy) == len(every) == math.ceil(MAX_STEPS / 5)
    for a, b in zip(every, lazy):
        for key in ("observation/image", "observation/wrist_image", "observation/state"):
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"seed {seed}: {key}")

    env.reset()
    robosuite_env = env.env.env
    render = libero.render_only_when_read(env)
    renders = []
    original = robosuite_env.sim.render
    robosuite_env.sim.render = lambda *args, **kwargs: renders.append(kwargs.get("camera_name")) or original(*args, **kwargs)
    render(False)
    for _ in range(3):
        env.step(libero.WAIT_ACTION)
    assert renders == []
    render(True)
    env.step(libero.WAIT_ACTION)
    assert sorted(renders) == ["agentview", "robot0_eye_in_hand"]


@needs_libero
def test_episode_rejects_a_short_action_chunk(env):
    with pytest.raises(ValueError, match=r"replan_steps=5.*\(3, 7\)"):
        libero.run_episode(
            env,
            lambda request: np.full((3, 7), 0.1),
            task_description="x",
            initial_state=libero.initial_states(SUITE, TASK_ID)[0],
            max_steps=5,
            num_wait=0,
        )


@needs_libero
def test_evaluate_reports_tasks_episodes_and_videos(tmp_path):
    imageio = pytest.importorskip("imageio")
    seen = []
    result = libero.evaluate(
        SUITE,
        [1],
        2,
        lambda request: np.tile([0.05, 0.0, -0.05, 0.0, 0.0, 0.0, -1.0], (5, 1)),
        max_steps=5,
        video_dir=tmp_path,
        progress=lambda task_id, trial, episode: seen.append((task_id, trial, episode.steps)),
    )
    assert seen == [(1, 0, 5), (1, 1, 5)]
    assert result.suite == SUITE and result.max_steps == 5
    assert [t.task_id for t in result.tasks] == [1]
    assert result.tasks[0].description == libero.list_tasks(SUITE)[1]
    episodes = result.tasks[0].episodes
    assert [(e.success, e.steps, e.policy_calls) for e in episodes] == [(False, 5, 1)] * 2
    assert result.episodes == 2 and result.successes == 0 and result.success_rate == 0.0
    # Different initial states: the two episodes' videos differ.
    videos = [e.video_path for e in episodes]
    assert [v.name for v in videos] == [f"{SUITE}_task01_trial0{i}_failure.mp4" for i in range(2)]
    clips = [np.stack(imageio.mimread(v)) for v in videos]
    assert all(c.shape == (5, 224, 224, 3) for c in clips)
    assert not np.array_equal(clips[0], clips[1])
    summary = json.loads(json.dumps(result.to_dict()))
    assert summary["tasks"][0]["episodes"][1]["video_path"] == str(videos[1])


@needs_libero
def test_evaluate_rejects_bad_arguments():
    with pytest.raises(ValueError, match="Unknown LIBERO suite 'libero_nine'"):
        libero.evaluate("libero_nine", [0], 1, lambda r: None)
    with pytest.raises(ValueError, match="task_id 10 out of range"):
        libero.evaluate(SUITE, [10], 1, lambda r: None)
    with pytest.raises(ValueError, match="has 50 initial states; 51 trials"):
        libero.evaluate(SUITE, [0], 51, lambda r: None)
