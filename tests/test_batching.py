"""Dynamic batching in the policy server, its metrics, and the runtime's batched, padded inference.

Batching is made deterministic without depending on the machine's speed: either a batch can only
close by filling up (a long max_wait_ms), or the first batch is held on the policy thread until
/metrics shows the expected number of requests queued behind it, so the batches that follow are
fixed by max_batch alone.
"""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
import websockets
import websockets.sync.client
from prometheus_client.parser import text_string_to_metric_families

from pi_build.runtime.batching import (
    OneAtATime,
    as_batch_policy,
    draw_noise,
    noise_seed,
    pad_rows,
    run_padded,
    smallest_batch_size,
)
from pi_build.errors import InputError
from test_serve import (
    HORIZON,
    REPO,
    TIMEOUT_S,
    connect,
    fake_policy,
    from_json,
    http_get,
    infer,
    pack,
    random_observation,
    running_server,
    send_and_collect_error,
    unpack,
)

MAX_PROMPT_CHARS = 60  # what RowWisePolicy accepts; longer prompts are refused in prepare()


# --- the pure parts: batch sizes, padding, noise ----------------------------------------------------


@pytest.mark.parametrize("n_rows, size", [(1, 1), (2, 4), (4, 4), (5, 16), (16, 16)])
def test_smallest_batch_size_holds_the_rows(n_rows, size):
    assert smallest_batch_size(n_rows, [16, 1, 4]) == size


@pytest.mark.parametrize("n_rows", [0, 17])
def test_smallest_batch_size_refuses_what_no_engine_holds(n_rows):
    with pytest.raises(ValueError, match=rf"cannot run {n_rows} rows on engines built for batch sizes \[1, 4, 16\]"):
        smallest_batch_size(n_rows, [1, 4, 16])


def test_run_padded_pads_with_the_first_row_and_returns_the_real_rows():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(3, 5)).astype(np.float32))
    mask = torch.tensor([[True, False], [False, True], [True, True]])
    seen: list[tuple[int, tuple[torch.Tensor, ...]]] = []

    def engines(size: int, padded: tuple[torch.Tensor, ...]) -> torch.Tensor:
        seen.append((size, padded))
        values, masks = padded
        return torch.tanh(values * 3) * masks.sum(dim=1, keepdim=True)  # each row from its own row only

    out = run_padded((x, mask), [1, 4, 16], engines)

    (size, (padded_x, padded_mask)), = seen
    assert size == 4 and padded_x.shape == (4, 5) and padded_mask.shape == (4, 2)
    torch.testing.assert_close(padded_x[:3], x, rtol=0, atol=0)
    torch.testing.assert_close(padded_x[3], x[0], rtol=0, atol=0)  # padding = a copy of a real row
    assert padded_mask[3].tolist() == [True, False]
    torch.testing.assert_close(out, torch.tanh(x * 3) * mask.sum(dim=1, keepdim=True), rtol=0, atol=0)


def test_pad_rows_refuses_to_shrink_and_run_padded_checks_what_the_engines_return():
    assert pad_rows(torch.ones(2, 3), 2).shape == (2, 3)
    with pytest.raises(ValueError, match="cannot pad 3 rows down to 2"):
        pad_rows(torch.ones(3, 1), 2)
    with pytest.raises(ValueError, match="inputs disagree on the number of rows"):
        run_padded((torch.ones(2, 1), torch.ones(3, 1)), [4], lambda size, padded: padded[0])
    with pytest.raises(ValueError, match="the engines of batch size 4 returned 1 rows"):
        run_padded((torch.ones(2, 1),), [4], lambda size, padded: padded[0][:1])


@pytest.mark.parametrize("value, seed", [(None, None), (0, 0), (7, 7), (np.int64(7), 7), (2**64 - 1, 2**64 - 1)])
def test_noise_seed_reads_integers(value, seed):
    request = {} if value is None else {"noise_seed": value}
    assert noise_seed(request) == seed


@pytest.mark.parametrize(
    "value, message",
    [(-1, r"must be in \[0, 2\*\*64\), got -1"), (2**64, "got 18446744073709551616"), (True, "got bool"),
     (1.5, "got float"), ("3", "got str")],
)
def test_noise_seed_refuses_what_is_not_a_seed(value, message):
    with pytest.raises(InputError, match=message):
        noise_seed({"noise_seed": value})


def test_draw_noise_is_a_function_of_the_seed_alone():
    generator = torch.Generator().manual_seed(5)
    a = draw_noise((HORIZON, 32), 11, generator)
    assert a.shape == (HORIZON, 32) and a.dtype == torch.float32
    unseeded_1, unseeded_2 = draw_noise((HORIZON, 32), None, generator), draw_noise((HORIZON, 32), None, generator)
    # A seeded draw neither uses nor advances the policy's generator: the unseeded ones are its 1st and 2nd draws.
    reference = torch.Generator().manual_seed(5)
    torch.testing.assert_close(unseeded_1, torch.randn(HORIZON, 32, generator=reference), rtol=0, atol=0)
    torch.testing.assert_close(unseeded_2, torch.randn(HORIZON, 32, generator=reference), rtol=0, atol=0)
    torch.testing.assert_close(draw_noise((HORIZON, 32), 11, torch.Generator()), a, rtol=0, atol=0)
    assert not torch.equal(draw_noise((HORIZON, 32), 12, generator), a)


def test_as_batch_policy_adapts_a_plain_callable():
    adapted = as_batch_policy(fake_policy)
    assert isinstance(adapted, OneAtATime) and adapted.max_batch == 1
    obs = random_observation(np.random.default_rng(0))
    assert adapted.prepare(obs) is obs
    np.testing.assert_array_equal(adapted.run([obs])[0]["actions"], fake_policy(obs)["actions"])
    policy = RowWisePolicy(max_batch=4)
    assert as_batch_policy(policy) is policy
    policy.max_batch = 0
    with pytest.raises(ValueError, match="max_batch must be an integer >= 1, got 0"):
        as_batch_policy(policy)
    with pytest.raises(TypeError, match="a policy must be callable or have prepare"):
        as_batch_policy(object())


# --- a batch policy whose rows are independent by construction ----------------------------------------


class RowWisePolicy:
    """A BatchPolicy: actions = fake_policy(obs) + the request's noise; it records each batch's size.

    With `hold_first_batch`, the first run() waits for `release` (set by the test), so the
    requests that arrive meanwhile queue up behind it.
    """

    def __init__(self, max_batch: int, hold_first_batch: bool = False):
        self.max_batch = max_batch
        self.batch_sizes: list[int] = []
        self.first_batch_started, self.release = threading.Event(), threading.Event()
        if not hold_first_batch:
            self.release.set()
        self._generator = torch.Generator().manual_seed(0)

    def prepare(self, request: dict) -> tuple[dict, int | None]:
        if len(request["prompt"]) > MAX_PROMPT_CHARS:
            raise InputError(f"prompt too long: {len(request['prompt'])} characters, at most {MAX_PROMPT_CHARS}")
        return request, noise_seed(request)

    def run(self, items: Sequence[tuple[dict, int | None]]) -> list[dict]:
        self.batch_sizes.append(len(items))
        self.first_batch_started.set()
        assert self.release.wait(TIMEOUT_S * 3), "the test never released the first batch"
        return [self.reply(request, seed) for request, seed in items]

    def reply(self, request: dict, seed: int | None) -> dict:
        noise = draw_noise((HORIZON, 7), seed, self._generator).numpy()
        return {"actions": fake_policy(request)["actions"] + noise, "policy_timing": {"rows": len(request["prompt"])}}


def expected_alone(obs: dict) -> np.ndarray:
    """What a request with a noise_seed gets when it is served alone."""
    return RowWisePolicy(max_batch=1).reply(obs, obs["noise_seed"])["actions"]


def seeded_observations(n: int, seed: int = 0) -> list[dict]:
    """n requests with different prompts (and lengths) and noise seeds."""
    rng = np.random.default_rng(seed)
    observations = []
    for i in range(n):
        obs = random_observation(rng)
        obs["prompt"] = f"task {i}: " + "pick up the bowl " * (i % 3 + 1)
        obs["noise_seed"] = 1000 + i
        observations.append(obs)
    return observations


def metric_samples(port: int, api_key: str | None = None) -> dict[tuple[str, tuple], float]:
    """/metrics parsed as Prometheus text: {(sample name, sorted labels): value}."""
    status, text = http_get(port, "/metrics", api_key)
    assert status == 200, text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def settled_metric_samples(port: int) -> dict[tuple[str, tuple], float]:
    """/metrics once every connection has ended: a handler counts its request after sending the reply,
    so a client can hold its reply a moment before the count is made."""
    wait_until(lambda: metric(metric_samples(port), "pi_build_serve_connections") == 0, "every client is gone")
    return metric_samples(port)


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.01)


def infer_from_threads(port: int, observations: list[dict]) -> list[dict | str]:
    """Each observation from its own client and thread, all at once; the replies, or the error text."""
    results: list[dict | str | BaseException | None] = [None] * len(observations)

    def client(i: int) -> None:
        try:
            with connect(port) as (conn, _):
                conn.send(pack(observations[i]))
                reply = conn.recv(timeout=TIMEOUT_S * 3)
                results[i] = unpack(reply) if isinstance(reply, bytes) else reply
        except BaseException as e:  # reported by the test thread
            results[i] = e

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(observations))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT_S * 4)
    assert not any(thread.is_alive() for thread in threads)
    assert not any(isinstance(r, BaseException) for r in results), results
    return results  # type: ignore[return-value]


def hold_first_batch(port: int, policy: RowWisePolicy) -> tuple[threading.Thread, list]:
    """Send one request that starts a batch and stays in it until policy.release is set."""
    first_reply: list = []

    def first_client() -> None:
        with connect(port) as (conn, _):
            first_reply.append(infer(conn, seeded_observations(1, seed=99)[0]))

    thread = threading.Thread(target=first_client)
    thread.start()
    assert policy.first_batch_started.wait(TIMEOUT_S)
    return thread, first_reply


# --- dynamic batching in the server ------------------------------------------------------------------


def test_queued_requests_run_in_batches_of_max_batch_and_each_gets_its_own_actions():
    policy = RowWisePolicy(max_batch=8, hold_first_batch=True)
    observations = seeded_observations(8)
    with running_server(policy, max_batch=3, max_wait_ms=0) as port:
        first, first_reply = hold_first_batch(port, policy)
        replies: list = []
        crowd = threading.Thread(target=lambda: replies.extend(infer_from_threads(port, observations)))
        crowd.start()
        wait_until(lambda: metric(metric_samples(port), "pi_build_serve_queued_requests") == 8,
                   "8 requests queue behind the held batch")
        policy.release.set()
        crowd.join(TIMEOUT_S * 4)
        first.join(TIMEOUT_S)
        samples = settled_metric_samples(port)

    # 8 queued, max_batch 3, nothing else arriving: 3 + 3 + 2, whatever the machine's speed.
    assert policy.batch_sizes == [1, 3, 3, 2]
    assert first_reply[0]["server_timing"]["batch_size"] == 1
    assert sorted(reply["server_timing"]["batch_size"] for reply in replies) == [2, 2, 3, 3, 3, 3, 3, 3]
    for obs, reply in zip(observations, replies, strict=True):
        np.testing.assert_allclose(reply["actions"], expected_alone(obs), rtol=1e-6, atol=1e-6)
        assert reply["policy_timing"] == {"rows": len(obs["prompt"])}
        timing = reply["server_timing"]
        assert 0 <= timing["prepare_ms"] <= timing["queue_ms"] and timing["infer_ms"] >= 0
    assert metric(samples, "pi_build_serve_batch_size_count") == 4
    assert metric(samples, "pi_build_serve_batch_size_sum") == 9
    assert metric(samples, "pi_build_serve_batch_size_bucket", le="1.0") == 1
    assert metric(samples, "pi_build_serve_batch_size_bucket", le="2.0") == 2
    assert metric(samples, "pi_build_serve_batch_size_bucket", le="3.0") == 4
    assert metric(samples, "pi_build_serve_queued_requests") == 0


def test_a_batch_closes_as_soon_as_it_is_full():
    policy = RowWisePolicy(max_batch=4)
    observations = seeded_observations(8, seed=1)
    max_wait_ms = 60_000  # so long that only filling up can close a batch within the test's timeouts
    with running_server(policy, max_batch=4, max_wait_ms=max_wait_ms) as port:
        replies = infer_from_threads(port, observations)
    assert policy.batch_sizes == [4, 4]
    for obs, reply in zip(observations, replies, strict=True):
        assert reply["server_timing"]["batch_size"] == 4
        assert reply["server_timing"]["queue_ms"] < max_wait_ms
        np.testing.assert_allclose(reply["actions"], expected_alone(obs), rtol=1e-6, atol=1e-6)


def test_a_lone_request_waits_max_wait_ms_for_company_then_runs_alone():
    policy = RowWisePolicy(max_batch=4)
    obs = seeded_observations(1, seed=2)[0]
    with running_server(policy, max_batch=4, max_wait_ms=150) as port, connect(port) as (conn, _):
        reply = infer(conn, obs)
    assert policy.batch_sizes == [1]
    assert reply["server_timing"]["batch_size"] == 1
    assert reply["server_timing"]["queue_ms"] >= 150
    np.testing.assert_allclose(reply["actions"], expected_alone(obs), rtol=1e-6, atol=1e-6)


def test_max_batch_is_capped_by_the_policy(caplog):
    policy = RowWisePolicy(max_batch=2)
    with caplog.at_level("WARNING", logger="pi_build.runtime.serve"):
        with running_server(policy, max_batch=8, max_wait_ms=60_000) as port:
            replies = infer_from_threads(port, seeded_observations(4, seed=3))
    assert policy.batch_sizes == [2, 2]
    assert [reply["server_timing"]["batch_size"] for reply in replies] == [2, 2, 2, 2]
    assert "max_batch 8 asked, but the policy takes at most 2 requests per call" in caplog.text


def test_bad_requests_are_refused_before_batching_and_never_fail_their_batch_mates():
    policy = RowWisePolicy(max_batch=8, hold_first_batch=True)
    good = seeded_observations(3, seed=4)
    too_long = {**seeded_observations(1, seed=5)[0], "prompt": "x" * 100_000}
    bad_seed = {**seeded_observations(1, seed=6)[0], "noise_seed": -3}
    with running_server(policy, max_batch=8, max_wait_ms=0) as port:
        first, _ = hold_first_batch(port, policy)
        replies: list = []
        crowd = threading.Thread(target=lambda: replies.extend(infer_from_threads(port, good)))
        crowd.start()
        # While the first batch is still held, the bad requests already have their errors: they never
        # waited for a batch.
        too_long_error = send_and_collect_error(port, pack(too_long))
        bad_seed_error = send_and_collect_error(port, pack(bad_seed))
        wait_until(lambda: metric(metric_samples(port), "pi_build_serve_queued_requests") == 3, "3 requests queue")
        policy.release.set()
        crowd.join(TIMEOUT_S * 4)
        first.join(TIMEOUT_S)
        samples = settled_metric_samples(port)

    for (texts, code, reason), message in [
        (too_long_error, "bad request: prompt too long: 100000 characters, at most 60"),
        (bad_seed_error, "bad request: 'noise_seed' must be in [0, 2**64), got -3"),
    ]:
        assert code == 1011 and texts == [message] and reason == message
    assert policy.batch_sizes == [1, 3]
    for obs, reply in zip(good, replies, strict=True):
        np.testing.assert_allclose(reply["actions"], expected_alone(obs), rtol=1e-6, atol=1e-6)
    assert metric(samples, "pi_build_serve_requests_total", outcome="ok") == 4
    assert metric(samples, "pi_build_serve_requests_total", outcome="bad_request") == 2


class FailingRowPolicy(RowWisePolicy):
    """Its run() answers the request with prompt "fail" with a non-dict, or raises when asked to."""

    raise_in_run = False

    def run(self, items):
        if self.raise_in_run:
            raise RuntimeError(f"the engines broke on a batch of {len(items)}")
        replies = super().run(items)
        return [[1, 2] if request["prompt"] == "fail" else reply for (request, _), reply in zip(items, replies)]


def test_a_malformed_reply_fails_its_own_request_and_a_failed_batch_fails_each_of_its_requests():
    policy = FailingRowPolicy(max_batch=3)
    observations = seeded_observations(3, seed=7)
    observations[1]["prompt"] = "fail"
    with running_server(policy, max_batch=3, max_wait_ms=60_000) as port:
        results = infer_from_threads(port, observations)
        assert isinstance(results[1], str)
        assert results[1].startswith("policy failed: TypeError: the policy must return a dict, got list")
        for i in (0, 2):
            np.testing.assert_allclose(results[i]["actions"], expected_alone(observations[i]), rtol=1e-6, atol=1e-6)

        policy.raise_in_run = True
        results = infer_from_threads(port, seeded_observations(3, seed=8))
        for text in results:
            assert isinstance(text, str)
            assert text.startswith("policy failed: RuntimeError: the engines broke on a batch of 3\n")
            assert "Traceback (most recent call last)" in text
        samples = settled_metric_samples(port)
    assert policy.batch_sizes == [3]  # the second batch raised before it was recorded
    assert metric(samples, "pi_build_serve_requests_total", outcome="ok") == 2
    assert metric(samples, "pi_build_serve_requests_total", outcome="error") == 4


# --- metrics and timing ----------------------------------------------------------------------------


def test_metrics_count_the_requests_made_and_server_timing_is_sane():
    sleep_s = 0.02

    class SlowPolicy(RowWisePolicy):
        def run(self, items):
            time.sleep(sleep_s)
            return super().run(items)

    policy = SlowPolicy(max_batch=4)
    observations = seeded_observations(3, seed=9)
    with running_server(policy, max_batch=4, max_wait_ms=0) as port:
        before = metric_samples(port)
        with connect(port) as (conn, _):
            assert metric(metric_samples(port), "pi_build_serve_connections") == 1
            replies = [infer(conn, obs) for obs in observations]
        send_and_collect_error(port, pack({**observations[0], "prompt": 3}))  # refused by the request spec
        samples = settled_metric_samples(port)

    for outcome in ("ok", "bad_request", "error", "disconnected"):  # listed from the start
        assert metric(before, "pi_build_serve_requests_total", outcome=outcome) == 0
    assert metric(samples, "pi_build_serve_requests_total", outcome="ok") == 3
    assert metric(samples, "pi_build_serve_requests_total", outcome="bad_request") == 1
    assert metric(samples, "pi_build_serve_requests_total", outcome="error") == 0
    assert metric(samples, "pi_build_serve_batch_size_count") == 3
    assert metric(samples, "pi_build_serve_batch_size_sum") == 3
    assert metric(samples, "pi_build_serve_inference_seconds_count") == 3
    assert metric(samples, "pi_build_serve_inference_seconds_sum") >= 3 * sleep_s
    assert metric(samples, "pi_build_serve_queue_seconds_count") == 3
    assert metric(samples, "pi_build_serve_request_seconds_count") == 3
    assert metric(samples, "pi_build_serve_request_seconds_sum") >= 3 * sleep_s
    assert metric(samples, "pi_build_serve_refused_connections_total") == 0

    for i, reply in enumerate(replies):
        timing = reply["server_timing"]
        assert set(timing) == {"queue_ms", "infer_ms", "batch_size", "prepare_ms"} | ({"prev_total_ms"} if i else set())
        assert timing["batch_size"] == 1
        assert timing["infer_ms"] >= sleep_s * 1000
        assert 0 <= timing["prepare_ms"] <= timing["queue_ms"]
        if i:  # the previous request's receive-to-sent time holds its queueing and inference
            previous = replies[i - 1]["server_timing"]
            assert timing["prev_total_ms"] >= previous["queue_ms"] + previous["infer_ms"]


def test_metrics_answer_in_the_prometheus_text_format():
    import http.client

    with running_server(RowWisePolicy(max_batch=2), max_batch=2) as port:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT_S)
        try:
            conn.request("GET", "/metrics")
            response = conn.getresponse()
            content_type, body = response.getheader("Content-Type"), response.read().decode()
        finally:
            conn.close()
    assert response.status == 200
    assert content_type.startswith("text/plain; version=0.0.4")
    names = {family.name for family in text_string_to_metric_families(body)}
    assert {"pi_build_serve_requests", "pi_build_serve_batch_size", "pi_build_serve_queue_seconds",
            "pi_build_serve_inference_seconds", "pi_build_serve_request_seconds",
            "pi_build_serve_queued_requests", "pi_build_serve_connections"} <= names
    assert 'pi_build_serve_batch_size_bucket{le="2.0"} 0.0' in body


def test_two_servers_keep_their_own_counts():
    with running_server(RowWisePolicy(max_batch=1)) as port_a, running_server(RowWisePolicy(max_batch=1)) as port_b:
        with connect(port_a) as (conn, _):
            infer(conn, seeded_observations(1)[0])
        wait_until(lambda: metric(metric_samples(port_a), "pi_build_serve_requests_total", outcome="ok") == 1,
                   "server a counts its request")
        assert metric(metric_samples(port_b), "pi_build_serve_requests_total", outcome="ok") == 0


# --- the runtime's Policy over engines built for batch 4 ---------------------------------------------

@pytest.fixture(scope="module")
def batch4_policy(workspace):
    """The runtime's Policy over tiny fp32 engines built for batch size 4 (eager: about 20 s on 2 cores)."""
    from conftest import built_engines

    from pi_build.recipe import load_recipe
    from pi_build.runtime.pipeline import load_pipeline
    from pi_build.runtime.policy import load_policy

    recipe, engines = built_engines(workspace, "b4", "batch = 4", capture=False)
    return load_policy(load_pipeline(engines, load_recipe(recipe), "cpu"))


def libero_requests(n: int) -> list[dict]:
    """n recorded LIBERO observations as requests, each with its own prompt (of its own length) and noise seed."""
    from pi_build.transforms.libero import load_recorded_observations
    from pi_build.model.tokenizer import LIBERO_INSTRUCTIONS

    recorded = load_recorded_observations()
    requests = []
    for i in range(n):
        obs = recorded[i % len(recorded)]
        requests.append({"observation/image": obs["observation/image"],
                         "observation/wrist_image": obs["observation/wrist_image"],
                         "observation/state": obs["observation/state"],
                         "prompt": LIBERO_INSTRUCTIONS[(7 * i) % len(LIBERO_INSTRUCTIONS)], "noise_seed": 500 + i})
    return requests


@pytest.mark.slow
def test_padded_rows_do_not_change_the_real_rows(batch4_policy, workspace):
    """Batch-4 engines: a request alone (padded with 3 copies), with one other (2 pads) and in a full batch
    gets the same actions, and those are the float32 reference model's at batch 1."""
    policy = batch4_policy
    assert policy.batch_sizes == (4,) and policy.max_batch == 4
    a, b, c, d = (policy.prepare(request) for request in libero_requests(4))

    alone = policy.run([a])[0]["actions"]
    with_b = policy.run([a, b])
    full = policy.run([b, c, d, a])  # a in the last row this time
    assert alone.shape == (HORIZON, 7)
    np.testing.assert_allclose(with_b[0]["actions"], alone, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(full[3]["actions"], alone, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(full[0]["actions"], with_b[1]["actions"], rtol=1e-5, atol=1e-5)
    assert not np.allclose(full[0]["actions"], alone, atol=1e-3)  # the rows do differ: the check can fail

    # The same request through the float32 reference model, batch 1, with the same seeded noise.
    from pi_build.model.checkpoints import load_checkpoint

    request = libero_requests(1)[0]
    model, _ = load_checkpoint(workspace["ckpt"], dtype=torch.float32, device="cpu")
    inputs = policy.transforms.inputs(request)
    noise = draw_noise((HORIZON, 32), request["noise_seed"], torch.Generator())[None]
    raw = model.sample(inputs, noise, policy.pipeline.steps).float().numpy()
    reference = policy.transforms.outputs(raw, request)[0]
    np.testing.assert_allclose(alone, reference, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_the_runtime_policy_batches_behind_the_server(batch4_policy):
    """8 clients with different prompts and seeds on batch-4 engines: batches [4, 4], each client gets the
    actions it gets when served alone."""
    requests = libero_requests(8)
    batch_sizes: list[int] = []
    run = batch4_policy.run

    def recording_run(items):
        batch_sizes.append(len(items))
        return run(items)

    batch4_policy.run = recording_run  # the instance attribute shadows the method: sizes are recorded
    try:
        with running_server(batch4_policy, max_batch=4, max_wait_ms=60_000) as port:
            replies = infer_from_threads(port, requests)
    finally:
        del batch4_policy.run
    assert batch_sizes == [4, 4]
    for request, reply in zip(requests, replies, strict=True):
        alone = batch4_policy(request)["actions"]
        assert reply["server_timing"]["batch_size"] == 4
        np.testing.assert_allclose(reply["actions"], alone, rtol=1e-5, atol=1e-5)


def _run_openpi_client(python: Path, port: int, requests: list[dict], tmp_path: Path, *args: str) -> dict:
    import json
    import os

    path = tmp_path / f"obs-{port}.npz"
    np.savez(path, image=np.stack([r["observation/image"] for r in requests]),
             wrist_image=np.stack([r["observation/wrist_image"] for r in requests]),
             state=np.stack([r["observation/state"] for r in requests]).astype(np.float64),
             prompt=np.array([r["prompt"] for r in requests]), noise_seed=np.array([r["noise_seed"] for r in requests]))
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run([str(python), str(REPO / "scripts" / "openpi_client_check.py"), "--host", "127.0.0.1",
                             "--port", str(port), "--observations", str(path), *args],
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.slow
def test_eight_concurrent_openpi_clients_get_the_actions_they_get_one_at_a_time(
    openpi_client_python, batch4_policy, tmp_path
):
    requests = libero_requests(8)
    with running_server(batch4_policy, max_batch=4, max_wait_ms=60_000) as port:
        together = _run_openpi_client(openpi_client_python, port, requests, tmp_path, "--concurrent")
        batched = settled_metric_samples(port)
    with running_server(batch4_policy, max_batch=1) as port:
        one_at_a_time = _run_openpi_client(openpi_client_python, port, requests, tmp_path)
        single = settled_metric_samples(port)

    # 8 clients, batches close only when full: two batches of 4. One at a time: eight of 1.
    assert (metric(batched, "pi_build_serve_batch_size_count"), metric(batched, "pi_build_serve_batch_size_sum")) == (2, 8)
    assert (metric(single, "pi_build_serve_batch_size_count"), metric(single, "pi_build_serve_batch_size_sum")) == (8, 8)
    for reply_together, reply_alone in zip(from_json(together["replies"]), from_json(one_at_a_time["replies"]),
                                           strict=True):
        assert reply_together["server_timing"]["batch_size"] == 4 and reply_alone["server_timing"]["batch_size"] == 1
        assert reply_together["actions"].shape == (HORIZON, 7)
        np.testing.assert_allclose(reply_together["actions"], reply_alone["actions"], rtol=1e-5, atol=1e-5)
    actions = [reply["actions"] for reply in from_json(together["replies"])]
    assert not np.allclose(actions[0], actions[1], atol=1e-3)  # different requests, different actions
    assert together["bad_request_error"] is not None and "non-finite" in together["bad_request_error"]


def test_stopping_the_server_during_a_batch_neither_hangs_nor_fails():
    """Stop while a batch is held on the policy thread: clients get 1001 (going away), the batch
    finishes on the policy thread, and the server stops (running_server asserts it, without errors)."""
    policy = RowWisePolicy(max_batch=2, hold_first_batch=True)
    with contextlib.ExitStack() as client_scope:  # the client outlives the server
        with running_server(policy, max_batch=2) as port:
            client = client_scope.enter_context(
                websockets.sync.client.connect(f"ws://127.0.0.1:{port}", compression=None, max_size=None))
            assert isinstance(client.recv(timeout=TIMEOUT_S), bytes)  # the metadata
            client.send(pack(seeded_observations(1, seed=10)[0]))
            assert policy.first_batch_started.wait(TIMEOUT_S)
            threading.Timer(0.3, policy.release.set).start()  # after the stop below has begun
        with pytest.raises(websockets.ConnectionClosed) as closed:
            client.recv(timeout=TIMEOUT_S)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
    assert policy.batch_sizes == [1] and policy.release.is_set()
