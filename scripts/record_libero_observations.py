"""Records a few real LIBERO policy requests into pi-build's package data.

    .venv/bin/python scripts/record_libero_observations.py [--out PATH] [--assets DIR]

Runs short episodes (initial state 0, openpi's wait steps, then a scripted action chunk) of a few
tasks and keeps every request the policy was handed: exactly what a pi0 LIBERO policy sees, so
tests and demos can feed real observations without the simulator. Output arrays: base, wrist
[N, 224, 224, 3] uint8, state [N, 8] float32, prompt, suite [N] str, task_id [N] int64.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np

from pi_build.envs import libero

# Two requests per episode (steps 0 and 5): 4 scenes x 2 = 8 observations.
SCENES = [("libero_spatial", 0), ("libero_spatial", 5), ("libero_object", 0), ("libero_object", 7)]
STEPS_PER_EPISODE = 10
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src" / "pi_build" / "data" / libero.RECORDED_OBSERVATIONS


def scripted_policy(requests: list[dict]):
    """Moves the gripper down and sideways, open, then closing: the state and images change."""
    chunks = [
        np.tile([0.0, 0.3, -0.6, 0.0, 0.0, 0.0, -1.0], (5, 1)),
        np.tile([0.4, -0.2, -0.3, 0.0, 0.0, 0.2, 1.0], (5, 1)),
    ]

    def policy(request: dict) -> np.ndarray:
        requests.append(request)
        return chunks[(len(requests) - 1) % len(chunks)]

    return policy


def record(assets: Path | None) -> dict[str, np.ndarray]:
    libero.setup_libero(assets)
    rows: list[tuple[str, int, dict]] = []
    for suite, task_id in SCENES:
        requests: list[dict] = []
        env = libero.make_env(suite, task_id)
        try:
            libero.run_episode(
                env,
                scripted_policy(requests),
                task_description=libero.list_tasks(suite)[task_id],
                initial_state=libero.initial_states(suite, task_id)[0],
                max_steps=STEPS_PER_EPISODE,
            )
        finally:
            env.close()
        rows += [(suite, task_id, r) for r in requests]
        print(f"{suite} task {task_id}: {len(requests)} requests")
    return {
        "base": np.stack([r["observation/image"] for _, _, r in rows]),
        "wrist": np.stack([r["observation/wrist_image"] for _, _, r in rows]),
        "state": np.stack([r["observation/state"] for _, _, r in rows]).astype(np.float32),
        "prompt": np.array([r["prompt"] for _, _, r in rows]),
        "suite": np.array([suite for suite, _, _ in rows]),
        "task_id": np.array([task_id for _, task_id, _ in rows], dtype=np.int64),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--assets", type=Path, default=None, help="LIBERO asset folder")
    args = parser.parse_args()
    arrays = record(args.assets)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=args.out.parent, suffix=".npz")
    os.close(fd)
    np.savez_compressed(tmp, **arrays)
    os.chmod(tmp, 0o644)  # mkstemp makes it owner-only
    os.replace(tmp, args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB, {len(arrays['base'])} observations)")


if __name__ == "__main__":
    main()
