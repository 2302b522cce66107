"""LIBERO evaluation on Ray: the Wilson interval, the results file, the report, bad input through the
CLI, and real episodes on a real local Ray cluster of 2 workers (a worker killed mid-episode, a
rerun that resumes, the policy behind a server)."""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from pi_build.cli.run import app as run_app
from pi_build.errors import InputError
from pi_build.evaluation import (
    Episode,
    EvaluationError,
    InWorkerPolicy,
    ResultsFile,
    RunResult,
    build_report,
    plan_episodes,
    run_evaluation,
    wilson_interval,
)
from pi_build.evaluation.results import record_key

from conftest import invoke, runner

SUITE = "libero_spatial"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _record(suite: str, task_id: int, trial: int, success: bool, steps: int = 10, seed: int = 7, max_steps: int = 10,
            call_ms: tuple[float, ...] = (2.0,), infer_ms: tuple[float, ...] = (1.0,)) -> dict:
    return {"suite": suite, "task_id": task_id, "trial": trial, "seed": seed, "max_steps": max_steps,
            "description": f"task {task_id}", "success": success, "steps": steps, "policy_calls": len(call_ms),
            "latency_ms": {"call_ms": list(call_ms), "infer_ms": list(infer_ms)}, "video": None}


# --------------------------------------------------------------------------- Wilson interval


@pytest.mark.parametrize(
    ("successes", "trials", "low", "high"),
    [  # Newcombe (1998), Statistics in Medicine 17:857, Table I, the Wilson score method
        (81, 263, 0.2553, 0.3662),
        (15, 148, 0.0624, 0.1605),
        (0, 20, 0.0, 0.1611),
        (1, 29, 0.0061, 0.1718),
        # and the textbook 5 of 10
        (5, 10, 0.2366, 0.7634),
    ],
)
def test_wilson_interval_matches_published_values(successes, trials, low, high):
    got = wilson_interval(successes, trials)
    assert got == pytest.approx((low, high), abs=5e-5)


def test_summarize_samples_by_hand():
    """The one summary of samples (bench latencies and report statistics): 1..100 in a shuffled order."""
    from pi_build.runtime.timing import summarize

    samples = [float(v) for v in np.random.default_rng(7).permutation(np.arange(1, 101))]
    got = summarize(samples)
    # numpy's default (linear) percentile of 1..100 at q is 1 + 0.99 q
    assert got == pytest.approx({"count": 100, "mean": 50.5, "std": (9999 / 12) ** 0.5, "p50": 50.5, "p90": 90.1,
                                 "p95": 95.05, "p99": 99.01, "max": 100.0})
    assert summarize([]) == {"count": 0}


def test_wilson_interval_edges_and_symmetry():
    assert wilson_interval(0, 50)[0] == 0.0 and wilson_interval(50, 50)[1] == 1.0
    assert wilson_interval(50, 50)[0] == pytest.approx(1 - wilson_interval(0, 50)[1])
    low, high = wilson_interval(12, 50)
    assert (1 - high, 1 - low) == pytest.approx(wilson_interval(38, 50))
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


# --------------------------------------------------------------------------- results file and report


def test_results_file_drops_a_torn_last_line_and_counts_each_episode_once(tmp_path):
    path = tmp_path / "run.episodes.jsonl"
    results = ResultsFile(path)
    first, second = _record(SUITE, 0, 0, True), _record(SUITE, 0, 1, False)
    results.append(first)
    results.append(second)
    results.append({**first, "success": False})  # the same episode again: the first line wins
    with open(path, "a") as f:  # the writer died in the middle of a line
        f.write('{"suite": "libero_spatial", "task_id": 0, "tri')
    records = results.read()
    assert list(records) == [record_key(first), record_key(second)]
    assert records[record_key(first)]["success"] is True
    assert path.read_text().endswith("}\n")  # repaired: the next line starts on its own
    results.append(_record(SUITE, 0, 2, True))
    assert [r["trial"] for r in results.read().values()] == [0, 1, 2]


def test_results_file_refuses_episodes_of_other_engines(tmp_path):
    ours = {"model_id": "t", "engines": {"batch 1, prompt 200": {"vision": "v1", "kvcache": "v1", "denoise": "v2"}}}
    theirs = {"model_id": "t", "engines": {"batch 1, prompt 200": {"vision": "v1", "kvcache": "v1", "denoise": "v1"}}}
    results = ResultsFile(tmp_path / "r.episodes.jsonl")
    results.append({**_record(SUITE, 0, 0, True), "engines": theirs})
    plan = [Episode(SUITE, 0, 0, 7, 10), Episode(SUITE, 0, 1, 7, 10)]
    assert list(results.finished(plan, theirs)) == [plan[0].key]  # the same engines: resumed
    with pytest.raises(InputError, match="run by other engines .* choose another --out"):
        results.finished(plan, ours)


def test_results_file_refuses_a_foreign_line_and_another_step_budget(tmp_path):
    path = tmp_path / "run.episodes.jsonl"
    path.write_text('{"hello": 1}\n' + json.dumps(_record(SUITE, 0, 0, True)) + "\n")
    with pytest.raises(InputError, match="line 1 is not an episode record"):
        ResultsFile(path).read()
    path.write_text(json.dumps(_record(SUITE, 0, 0, True, max_steps=10)) + "\n")
    with pytest.raises(InputError, match="max_steps 10, but this run uses 20"):
        ResultsFile(path).finished([Episode(SUITE, 0, 0, 7, 20)])
    assert ResultsFile(path).finished([Episode(SUITE, 0, 1, 7, 10)]) == {}  # another trial: not done


def test_report_counts_per_task_and_suite_with_intervals(tmp_path):
    records = [_record(SUITE, 0, t, success=t < 3, steps=5 + t) for t in range(4)]
    records += [_record(SUITE, 1, t, success=False) for t in range(2)]
    records += [_record("libero_goal", 4, 0, success=True, steps=7, call_ms=(3.0, 5.0), infer_ms=(1.0, 2.0))]
    run = RunResult(records=records, newly_run=5, wall_seconds=12.5, workers=2, policy="worker")
    report = build_report(run, results_file=tmp_path / "x.jsonl", seed=7)
    assert [(t["suite"], t["task_id"], t["successes"], t["trials"]) for t in report["tasks"]] == [
        (SUITE, 0, 3, 4), (SUITE, 1, 0, 2), ("libero_goal", 4, 1, 1)]
    assert report["tasks"][0]["ci95"] == pytest.approx(list(wilson_interval(3, 4)))
    assert report["tasks"][0]["steps"]["mean"] == pytest.approx(6.5)
    spatial, goal = report["suites"]
    assert (spatial["tasks"], spatial["successes"], spatial["trials"]) == (2, 3, 6)
    assert spatial["ci95"] == pytest.approx(list(wilson_interval(3, 6)))
    assert (goal["successes"], goal["trials"]) == (1, 1)
    assert (report["episodes"], report["successes"], report["newly_run"], report["resumed"]) == (7, 4, 5, 2)
    assert report["success_rate"] == pytest.approx(4 / 7)
    assert report["successful_episode_steps"]["mean"] == pytest.approx((5 + 6 + 7 + 7) / 4)
    assert report["latency_ms"]["call_ms"]["count"] == 8 and report["latency_ms"]["call_ms"]["max"] == 5.0
    assert report["latency_ms"]["infer_ms"]["p50"] == 1.0
    assert "latency_ms" not in report["tasks"][0]["episodes"][0]  # the per-call lists stay in the results file
    json.dumps(report, allow_nan=False)


# --------------------------------------------------------------------------- bad input through the CLI


def _libero_args(workspace, tmp_path, *extra):
    return ["libero", "--recipe", workspace["recipe"], "--engines", workspace["engines"], "--out", tmp_path / "r.json", *extra]


def _assert_clean_error(result, exit_code, *phrases):
    assert result.exit_code == exit_code, result.output
    assert "Traceback" not in result.output
    for phrase in phrases:
        assert phrase in " ".join(result.output.split()), result.output  # rich may wrap long lines


def test_cli_refuses_zero_workers(workspace, tmp_path):
    result = runner.invoke(run_app, [str(a) for a in _libero_args(workspace, tmp_path, "--workers", "0")])
    _assert_clean_error(result, 2, "Invalid value for '--workers'")  # typer's own check (min=1)


def test_cli_names_an_unknown_suite_and_the_known_ones(workspace, tmp_path):
    result = invoke(run_app, _libero_args(workspace, tmp_path, "--suite", "libero_nine"))
    _assert_clean_error(result, 1, "unknown LIBERO suite 'libero_nine'", "libero_spatial, libero_object", "`paper`")
    assert not (tmp_path / "r.episodes.jsonl").exists()


def test_cli_gives_up_quickly_on_an_unreachable_cluster(workspace, tmp_path):
    address = f"127.0.0.1:{_free_port()}"  # nobody listens there
    result = invoke(run_app, _libero_args(workspace, tmp_path, "--address", address, "--workers", "2"))
    _assert_clean_error(result, 1, f"no Ray cluster answers at {address}", "ray start --head", "leave out --address")
    result = invoke(run_app, _libero_args(workspace, tmp_path, "--address", "headnode"))
    _assert_clean_error(result, 1, "--address 'headnode' is not a Ray cluster address", "HOST:PORT")


def test_cli_names_a_task_out_of_range_and_an_absent_policy_server(workspace, tmp_path):
    pytest.importorskip("libero", reason="LIBERO is not installed: run `bash scripts/install_libero.sh`")
    result = invoke(run_app, _libero_args(workspace, tmp_path, "--tasks", "2,10"))
    _assert_clean_error(result, 1, "task id 10 is out of range for libero_spatial, which has tasks 0 to 9")
    url = f"ws://127.0.0.1:{_free_port()}"
    result = invoke(run_app, _libero_args(workspace, tmp_path, "--tasks", "0", "--trials", "1", "--server-url", url))
    _assert_clean_error(result, 1, f"no policy server answers at {url}", "pi-run serve")


# --------------------------------------------------------------------------- real episodes on a real Ray cluster


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray cluster of 2 CPUs for the module; `pi-run libero` and run_evaluation use it
    (a caller's cluster is used as it is), and its worker processes stay warm between tests."""
    pytest.importorskip("libero", reason="LIBERO is not installed: run `bash scripts/install_libero.sh`")
    ray = pytest.importorskip("ray")
    from ray import cloudpickle  # Ray's own copy: registering with the cloudpickle package would not reach it

    # Workers cannot import this test module: ship the test's policy classes by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=128 * 2**20, log_to_driver=False,
             logging_level=logging.WARNING)
    yield ray
    ray.shutdown()
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def _lines(path: Path) -> list[dict]:
    text = path.read_text()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def test_two_workers_run_real_episodes_and_a_rerun_resumes(workspace, tmp_path, ray_cluster):
    out = tmp_path / "spatial.json"
    episodes_file = tmp_path / "spatial.episodes.jsonl"

    def run(trials: int):
        args = ["libero", "--recipe", workspace["recipe"], "--engines", workspace["engines"], "--suite", SUITE,
                "--tasks", "0", "--trials", trials, "--max-steps", 5, "--workers", 2, "--videos", 1, "--out", out]
        result = invoke(run_app, args)
        assert result.exit_code == 0, result.output
        assert f"results: {out}" in result.output
        return json.loads(out.read_text()), result.output

    report, output = run(trials=2)
    assert (report["episodes"], report["newly_run"], report["resumed"], report["workers"]) == (2, 2, 0, 2)
    records = _lines(episodes_file)
    assert sorted((r["task_id"], r["trial"]) for r in records) == [(0, 0), (0, 1)]
    for r in records:  # 5 steps = one chunk of 5 actions; a random tiny policy cannot succeed that fast
        assert (r["steps"], r["policy_calls"], r["success"], r["policy"]) == (5, 1, False, "worker")
        assert r["worker"]["pid"] != os.getpid()  # run on a Ray worker, not here
    assert report["ci95"] == pytest.approx(list(wilson_interval(0, 2)))
    assert report["latency_ms"]["call_ms"]["count"] == 2 and report["latency_ms"]["infer_ms"]["count"] == 2
    assert "LIBERO success" in output and "0/2" in output and "infer_ms" in output
    # --videos 1: trial 0 of each task is filmed, through the driver
    assert [Path(v).name for v in report["videos"]] == ["libero_spatial_task00_trial00_failure.mp4"]
    assert Path(report["videos"][0]).stat().st_size > 0

    with open(episodes_file, "a") as f:  # a crash in the middle of writing a line
        f.write('{"suite": "libero_spatial", "task_id": 0, "trial": 2, "se')
    report, _ = run(trials=3)
    assert (report["episodes"], report["newly_run"], report["resumed"]) == (3, 1, 2)
    records = _lines(episodes_file)
    assert sorted((r["task_id"], r["trial"]) for r in records) == [(0, 0), (0, 1), (0, 2)]
    assert [e["trial"] for e in report["tasks"][0]["episodes"]] == [0, 1, 2]

    report, _ = run(trials=3)  # everything done: nothing runs, the report is the same
    assert (report["episodes"], report["newly_run"], report["resumed"]) == (3, 0, 3)
    assert len(_lines(episodes_file)) == 3


class PausingPolicy:
    """The real policy, except in the first worker process to call it: that one writes its pid to
    `pid_file` and waits inside its policy call, mid-episode, for the test to kill it."""

    def __init__(self, inner, pid_file: Path):
        self.inner, self.pid_file = inner, pid_file

    def __call__(self, request):
        try:
            fd = os.open(self.pid_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        except FileExistsError:  # not the chosen one
            return self.inner(request)
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        time.sleep(600)  # killed long before this ends
        raise AssertionError("the paused worker was not killed")


def pausing_policy(engines: Path, recipe: Path, pid_file: Path) -> PausingPolicy:
    from pi_build.recipe import load_recipe
    from pi_build.runtime.policy import policy_for_recipe

    return PausingPolicy(policy_for_recipe(engines, load_recipe(recipe), "cpu"), pid_file)


def _kill_when_paused(pid_file: Path, killed: list[int]) -> None:
    deadline = time.monotonic() + 600  # a guard against a hang, not a measurement
    while time.monotonic() < deadline:
        if pid_file.exists() and pid_file.read_text():
            pid = int(pid_file.read_text())
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            return
        time.sleep(0.2)


def test_a_worker_killed_mid_episode_loses_nothing(workspace, tmp_path, ray_cluster):
    pid_file = tmp_path / "paused.pid"
    plan = plan_episodes([SUITE], [0], 3, max_steps_cap=5)
    policy = InWorkerPolicy(functools.partial(pausing_policy, workspace["engines"], workspace["recipe"], pid_file), name="pausing")
    results = ResultsFile(tmp_path / "kill.episodes.jsonl")
    killed: list[int] = []
    killer = threading.Thread(target=_kill_when_paused, args=(pid_file, killed), daemon=True)
    killer.start()
    seen = []
    run = run_evaluation(plan, results, policy, workers=2, on_episode=seen.append)
    killer.join(timeout=1)

    assert len(killed) == 1  # one worker process was SIGKILLed in the middle of an episode
    with pytest.raises(ProcessLookupError):
        os.kill(killed[0], 0)  # and is gone
    expected = [(SUITE, 0, trial, 7) for trial in range(3)]
    assert [record_key(r) for r in run.records] == expected  # each episode once, in plan order
    assert sorted(record_key(r) for r in _lines(results.path)) == expected  # and once in the file
    assert sorted(record_key(r) for r in seen) == expected
    assert run.newly_run == 3
    # The killed worker's episode was retried elsewhere: no record comes from the dead process.
    assert killed[0] not in {r["worker"]["pid"] for r in run.records}
    assert all(r["steps"] == 5 and r["policy_calls"] == 1 for r in run.records)


def test_policy_behind_a_server_started_by_the_command(workspace, tmp_path, ray_cluster):
    out = tmp_path / "server.json"
    result = invoke(run_app, ["libero", "--recipe", workspace["recipe"], "--engines", workspace["engines"], "--suite", SUITE,
                              "--tasks", "0", "--trials", 2, "--max-steps", 5, "--workers", 2, "--policy", "server",
                              "--out", out])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    records = _lines(tmp_path / "server.episodes.jsonl")
    assert report["policy"] == "server" and {r["policy"] for r in records} == {"server"}
    assert report["latency_ms"]["infer_ms"]["count"] == 2 and report["latency_ms"]["call_ms"]["count"] == 2
    for r in records:
        # The worker's wait includes the server's inference (and the network) around it.
        assert r["latency_ms"]["call_ms"][0] > r["latency_ms"]["infer_ms"][0]
        assert r["worker"]["pid"] != os.getpid()


def engines_that_are_gone():
    raise FileNotFoundError("no engines under /nowhere")


def test_an_episode_that_raises_stops_the_run_and_says_how_to_resume(tmp_path, ray_cluster):
    plan = plan_episodes([SUITE], [0], 2, max_steps_cap=5)
    results = ResultsFile(tmp_path / "broken.episodes.jsonl")
    policy = InWorkerPolicy(engines_that_are_gone, name="gone")
    with pytest.raises(EvaluationError) as raised:
        run_evaluation(plan, results, policy, workers=2)
    first, second = str(raised.value).splitlines()
    assert first.startswith(f"{SUITE} task 0 trial ") and first.endswith("failed: FileNotFoundError: no engines under /nowhere")
    assert second == f"0 of 2 episodes are saved in {results.path}; fix the cause and rerun the same command to resume"
    assert not results.path.exists()
