"""What an evaluation runs: the paper protocol and the list of episodes it expands to.

The protocol is the one openpi's LIBERO example defines (see shared/design/PI0-FACTS.md): four
suites, 50 trials per task over the benchmark's fixed initial states (trial i starts from initial
state i), a per-suite step budget, 10 do-nothing steps while the objects settle, and a new action
chunk every 5 executed actions.

An episode is identified by (suite, task_id, trial) and the run's seed; those four values are the
key of its line in the results file, so a rerun knows what is already done.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Sequence

import numpy as np

from pi_build.envs import libero
from pi_build.errors import InputError

PAPER_SUITES = ("libero_spatial", "libero_object", "libero_goal", "libero_10")
TRIALS_PER_TASK = 50
NUM_WAIT_STEPS = 10
REPLAN_STEPS = 5
DEFAULT_SEED = 7  # openpi's
QUICK_TASKS, QUICK_TRIALS = 3, 3  # `--quick`: a smoke run, not a measurement

EpisodeKey = tuple[str, int, int, int]  # (suite, task_id, trial, seed)


@dataclasses.dataclass(frozen=True, order=True)
class Episode:
    """One episode to run: which task, which initial state, under which seed and step budget."""

    suite: str
    task_id: int
    trial: int  # also the index of the initial state it starts from
    seed: int
    max_steps: int  # policy-driven steps before the episode counts as a failure

    @property
    def key(self) -> EpisodeKey:
        return (self.suite, self.task_id, self.trial, self.seed)

    @property
    def label(self) -> str:
        return f"{self.suite} task {self.task_id} trial {self.trial}"

    def simulator_seed(self) -> int:
        """The seed the simulator and numpy get right before this episode.

        openpi seeds once per run and plays the episodes in order; here episodes run on any worker
        in any order, so each derives its own seed from (seed, suite, task, trial): an episode
        behaves the same whichever worker runs it and whatever ran there before.
        """
        spawn_key = (zlib.crc32(self.suite.encode()), self.task_id, self.trial)  # crc32: the same in every process
        return int(np.random.SeedSequence(self.seed, spawn_key=spawn_key).generate_state(1)[0])


def parse_suites(text: str) -> list[str]:
    """`--suite`: one suite, a comma-separated list, or `paper` for the four suites of the paper."""
    names = list(PAPER_SUITES) if text.strip() == "paper" else [s.strip() for s in text.split(",") if s.strip()]
    unknown = [name for name in names if name not in libero.SUITES]
    if unknown or not names:
        raise InputError(
            f"unknown LIBERO suite {', '.join(map(repr, unknown)) or repr(text)}; "
            f"use one of {', '.join(libero.SUITES)} (comma-separated), or `paper` for {', '.join(PAPER_SUITES)}"
        )
    return list(dict.fromkeys(names))  # keep the order, drop repeats


def parse_task_ids(text: str | None) -> list[int] | None:
    """`--tasks 0,3,7` -> [0, 3, 7]; None means every task of each suite."""
    if text is None:
        return None
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise InputError(f"--tasks takes comma-separated task ids such as 0,3,7; got {text!r}") from None
    if not ids:
        raise InputError(f"--tasks takes comma-separated task ids such as 0,3,7; got {text!r}")
    return list(dict.fromkeys(ids))


def step_budget(suite: str, cap: int | None) -> int:
    """The suite's step budget, lowered to `cap` for short smoke runs."""
    return libero.SUITES[suite] if cap is None else min(libero.SUITES[suite], cap)


def plan_episodes(
    suites: Sequence[str],
    task_ids: Sequence[int] | None,
    trials: int,
    *,
    seed: int = DEFAULT_SEED,
    max_steps_cap: int | None = None,
    quick: bool = False,
) -> list[Episode]:
    """Every episode of the run, task by task; checks every task before the first episode runs.

    Needs the LIBERO package (it reads the suites' task lists and initial states). `quick` keeps
    the first three tasks (of `task_ids`, else 0, 1, 2) and three trials.
    """
    if quick:
        trials = QUICK_TRIALS
    if trials < 1:
        raise InputError(f"--trials must be at least 1, got {trials}")
    if max_steps_cap is not None and max_steps_cap < 1:
        raise InputError(f"--max-steps must be at least 1, got {max_steps_cap}")
    episodes = []
    for suite in suites:
        n_tasks = len(libero.list_tasks(suite))
        ids = list(range(n_tasks)) if task_ids is None else list(task_ids)
        if quick:
            ids = ids[:QUICK_TASKS]
        out_of_range = [i for i in ids if not 0 <= i < n_tasks]
        if out_of_range:
            raise InputError(
                f"task id {out_of_range[0]} is out of range for {suite}, which has tasks 0 to {n_tasks - 1}; "
                f"pick --tasks from that range"
            )
        for task_id in ids:
            n_states = len(libero.initial_states(suite, task_id))
            if trials > n_states:
                raise InputError(
                    f"{suite} task {task_id} has {n_states} fixed initial states, fewer than the {trials} "
                    f"trials asked; use --trials {n_states} or fewer"
                )
            budget = step_budget(suite, max_steps_cap)
            episodes += [Episode(suite, task_id, trial, seed, budget) for trial in range(trials)]
    return episodes
