"""The websocket policy server: openpi's wire format, request checks, errors, concurrency.

Every server runs on loopback on a free port in a thread of this process, with a small
deterministic fake policy whose actions are a function of the request, so each reply can be checked
against the request it answers. openpi's own client (openpi-client from PyPI, which needs numpy<2)
runs in a separate venv created once under $PI_BUILD_CACHE or <repo>/.cache.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import msgpack
import numpy as np
import pytest
import websockets
import websockets.sync.client

from pi_build.errors import ServeError
from pi_build.runtime.serve import (
    LIBERO_REQUEST_SPEC,
    ArraySpec,
    BadRequest,
    check_can_listen,
    decode_request,
    exposure_warning,
    pack,
    serve,
    unpack,
    validate_request,
)

REPO = Path(__file__).resolve().parents[1]
HORIZON = 10
# Every wait below is a guard against a hang, never a speed check: generous, so that a loaded
# machine never trips it.
TIMEOUT_S = 60
# A process started in the background of a shell without job control (`cmd &` in a script, as some
# CI runners do) inherits SIGINT ignored, and Python then keeps ignoring Ctrl-C, as it should. The
# tests that press Ctrl-C start their server with SIGINT's default handler back in place.
CTRL_C_HONOURED = "import signal; signal.signal(signal.SIGINT, signal.default_int_handler)\n"
METADATA = {"policy": "fake-libero", "action_horizon": np.int64(HORIZON), "state_offset": np.linspace(-1, 1, 8)}


def fake_policy(obs: dict) -> dict:
    """actions[h, j] = state[j] * (h + 1) + image[h, j, 0] / 255 - wrist[j, h, 2] / 255 + len(prompt)."""
    state = obs["observation/state"].astype(np.float64)
    h = np.arange(HORIZON)[:, None]
    j = np.arange(7)[None, :]
    actions = (
        state[:7][None, :] * (h + 1)
        + obs["observation/image"][h, j, 0] / 255.0
        - obs["observation/wrist_image"][j, h, 2] / 255.0
        + len(obs["prompt"])
    )
    return {"actions": actions.astype(np.float32), "policy_timing": {"infer_ms": float(len(obs["prompt"]))}}


def random_observation(rng: np.random.Generator, state_dtype: type = np.float32) -> dict:
    return {
        "observation/image": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
        "observation/wrist_image": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
        "observation/state": rng.normal(size=8).astype(state_dtype),
        "prompt": "put the bowl on the plate" + "!" * int(rng.integers(0, 20)),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(policy: Callable[[dict], dict], **kwargs) -> Iterator[int]:
    """serve() in a thread; yields its port; stops it and checks it ended cleanly."""
    port = free_port()
    ready, stop = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            serve(policy, host="127.0.0.1", port=port, metadata=METADATA, ready=ready, stop=stop, **kwargs)
        except BaseException as e:
            errors.append(e)
            ready.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(TIMEOUT_S), "server did not start"
    assert not errors, errors
    try:
        yield port
    finally:
        stop.set()
        thread.join(TIMEOUT_S)
        assert not thread.is_alive(), "server did not stop"
        assert not errors, errors


@contextlib.contextmanager
def connect(port: int, api_key: str | None = None) -> Iterator[tuple[websockets.sync.client.ClientConnection, dict]]:
    """A connection and the metadata the server sent first; with `api_key`, sent as openpi-client sends it."""
    with websockets.sync.client.connect(
        f"ws://127.0.0.1:{port}", compression=None, max_size=None, open_timeout=TIMEOUT_S, close_timeout=TIMEOUT_S,
        additional_headers=api_key_header(api_key),
    ) as conn:
        first = conn.recv(timeout=TIMEOUT_S)
        assert isinstance(first, bytes), f"expected metadata first, got {first!r}"
        yield conn, unpack(first)


def infer(conn: websockets.sync.client.ClientConnection, obs: dict) -> dict:
    conn.send(pack(obs))
    reply = conn.recv(timeout=TIMEOUT_S)
    assert isinstance(reply, bytes), f"server answered with an error: {reply}"
    return unpack(reply)


def api_key_header(api_key: str | None) -> dict[str, str]:
    """The header openpi-client sends for its api_key (openpi_client/websocket_client_policy.py)."""
    return {} if api_key is None else {"Authorization": f"Api-Key {api_key}"}


def http_get(port: int, path: str, api_key: str | None = None) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT_S)
    try:
        conn.request("GET", path, headers=api_key_header(api_key))
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def assert_reply_answers(reply: dict, obs: dict) -> None:
    expected = fake_policy(obs)["actions"]
    assert reply["actions"].dtype == np.float32 and reply["actions"].shape == (HORIZON, 7)
    np.testing.assert_array_equal(reply["actions"], expected)


# --- wire format ---------------------------------------------------------------------------------


def test_wire_format_matches_openpi_msgpack_numpy():
    array = np.arange(6, dtype=np.float32).reshape(2, 3) * 1.5
    raw = msgpack.unpackb(pack({"a": array, "s": np.float32(2.5), "n": 3}))  # no numpy decoding
    assert raw == {
        "a": {b"__ndarray__": True, b"data": array.tobytes(), b"dtype": "<f4", b"shape": [2, 3]},
        "s": {b"__npgeneric__": True, b"data": 2.5, b"dtype": "<f4"},
        "n": 3,
    }
    decoded = unpack(pack({"a": array, "s": np.float32(2.5)}))
    assert decoded["a"].dtype == np.float32
    np.testing.assert_array_equal(decoded["a"], array)
    assert type(decoded["s"]) is np.float32 and decoded["s"] == np.float32(2.5)


@pytest.mark.parametrize(
    "array_map, message",
    [
        ({b"__ndarray__": True, b"data": b"\0" * 8, b"dtype": "|O", b"shape": [1]}, "dtype object is not accepted"),
        ({b"__ndarray__": True, b"data": b"\0" * 7, b"dtype": "<f4", b"shape": [2]}, "needs 8 bytes"),
    ],
)
def test_decode_refuses_unsafe_or_inconsistent_arrays(array_map, message):
    with pytest.raises(BadRequest, match=message):
        decode_request(msgpack.packb({"x": array_map}), {})


def test_validator_takes_other_robots_specs():
    spec = {"observation/joints": ArraySpec((14,), ("float32",), finite=True), "prompt": str}
    good = {"observation/joints": np.random.default_rng().normal(size=14).astype(np.float32), "prompt": "fold"}
    validate_request(good, spec)
    with pytest.raises(BadRequest, match=r"'observation/joints' has shape \(8,\), expected \(14,\)"):
        validate_request({**good, "observation/joints": np.ones(8, np.float32)}, spec)
    with pytest.raises(BadRequest, match="missing key"):
        validate_request(good, LIBERO_REQUEST_SPEC)


# --- round trip -----------------------------------------------------------------------------------

POLICY_SLEEP_S = 0.01


def slow_fake_policy(obs: dict) -> dict:
    time.sleep(POLICY_SLEEP_S)
    return fake_policy(obs)


def test_round_trip_with_our_client():
    rng = np.random.default_rng()
    with running_server(slow_fake_policy) as port:
        assert http_get(port, "/healthz") == (200, "OK\n")
        assert http_get(port, "/")[0] == 426  # anything else is a websocket endpoint

        with connect(port) as (conn, metadata):
            assert metadata["policy"] == "fake-libero"
            assert type(metadata["action_horizon"]) is np.int64 and metadata["action_horizon"] == HORIZON
            np.testing.assert_array_equal(metadata["state_offset"], METADATA["state_offset"])

            for i, state_dtype in enumerate([np.float32, np.float64, np.float32]):
                obs = random_observation(rng, state_dtype)
                reply = infer(conn, obs)
                assert_reply_answers(reply, obs)
                assert reply["policy_timing"] == {"infer_ms": float(len(obs["prompt"]))}
                timing = reply["server_timing"]
                assert timing["infer_ms"] >= POLICY_SLEEP_S * 1000  # time.sleep sleeps at least that long
                assert timing["queue_ms"] >= 0
                # The total of a request is known only after its reply is sent: it comes one reply late.
                assert ("prev_total_ms" in timing) == (i > 0)
                if i > 0:
                    assert timing["prev_total_ms"] >= POLICY_SLEEP_S * 1000


# --- openpi's own client --------------------------------------------------------------------------


def from_json(value):
    """Undo scripts/openpi_client_check.py's to_json."""
    if isinstance(value, dict) and "ndarray" in value:
        return np.array(value["values"], dtype=value["ndarray"]).reshape(value["shape"])
    if isinstance(value, dict) and "npgeneric" in value:
        return np.dtype(value["npgeneric"]).type(value["value"])
    if isinstance(value, dict):
        return {key: from_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [from_json(item) for item in value]
    return value


@pytest.mark.slow  # the first run creates the venv (about 10 s with PyPI at hand)
def test_openpi_client_from_pypi(openpi_client_python, tmp_path):
    rng = np.random.default_rng()
    # float64 state as openpi's LIBERO example sends it (np.concatenate of float64 arrays).
    observations = [random_observation(rng, np.float64) for _ in range(3)]
    np.savez(
        tmp_path / "obs.npz",
        image=np.stack([o["observation/image"] for o in observations]),
        wrist_image=np.stack([o["observation/wrist_image"] for o in observations]),
        state=np.stack([o["observation/state"] for o in observations]),
        prompt=np.array([o["prompt"] for o in observations]),
    )
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    with running_server(fake_policy) as port:
        result = subprocess.run(
            [str(openpi_client_python), str(REPO / "scripts" / "openpi_client_check.py"),
             "--host", "127.0.0.1", "--port", str(port), "--observations", str(tmp_path / "obs.npz")],
            capture_output=True, text=True, timeout=60, env=env,
        )  # fmt: skip
    assert result.returncode == 0, result.stderr
    output = json.loads(result.stdout)

    metadata = from_json(output["metadata"])
    assert metadata["policy"] == "fake-libero"
    assert type(metadata["action_horizon"]) is np.int64 and metadata["action_horizon"] == HORIZON
    np.testing.assert_array_equal(metadata["state_offset"], METADATA["state_offset"])

    replies = from_json(output["replies"])
    assert len(replies) == len(observations)
    for reply, obs in zip(replies, observations, strict=True):
        assert_reply_answers(reply, obs)
        assert "infer_ms" in reply["server_timing"]

    error = output["bad_request_error"]
    assert error is not None, "openpi's client did not raise on a NaN state"
    assert "bad request: 'observation/state' has non-finite values (NaN or inf) at flat indices [3]" in error


# --- bad input ------------------------------------------------------------------------------------

SMALL_MAX_FRAME = 512 * 1024  # a LIBERO request is ~0.3 MB


def _without(obs: dict, key: str) -> dict:
    return {k: v for k, v in obs.items() if k != key}


# Each case: (make the frame from a good observation, expected close code, text the error must contain).
BAD_REQUESTS = {
    "missing key": (
        lambda obs: pack(_without(obs, "observation/wrist_image")),
        1011,
        "missing key(s) ['observation/wrist_image']",
    ),
    "wrong shape": (
        lambda obs: pack({**obs, "observation/image": obs["observation/image"][:200]}),
        1011,
        "'observation/image' has shape (200, 224, 3), expected (224, 224, 3)",
    ),
    "wrong dtype": (
        lambda obs: pack({**obs, "observation/state": obs["observation/state"].astype(np.int64)}),
        1011,
        "'observation/state' has dtype int64, expected float32 or float64",
    ),
    "NaN state": (
        lambda obs: pack({**obs, "observation/state": np.where(np.arange(8) == 5, np.nan, obs["observation/state"])}),
        1011,
        "'observation/state' has non-finite values (NaN or inf) at flat indices [5]",
    ),
    "prompt not a string": (lambda obs: pack({**obs, "prompt": 7}), 1011, "'prompt' must be a string, got int"),
    "not a map": (lambda obs: pack([1, 2, 3]), 1011, "request must be a map of observation keys, got list"),
    "non-msgpack bytes": (lambda obs: b"\xc1 these bytes are not msgpack", 1011, "frame is not valid msgpack"),
    "text frame": (lambda obs: "hello", 1011, "expected a binary msgpack frame, got a text frame"),
    "oversized frame": (
        lambda obs: pack({**obs, "extra": np.ones(SMALL_MAX_FRAME, np.uint8)}),
        1009,
        f"exceeds limit of {SMALL_MAX_FRAME} bytes",
    ),
}


def send_and_collect_error(port: int, frame: str | bytes) -> tuple[list[str], int | None, str]:
    """Send one bad frame; return the text frames received, then the close code and reason."""
    texts = []
    with connect(port) as (conn, _):
        try:
            conn.send(frame)
            while True:
                message = conn.recv(timeout=TIMEOUT_S)
                assert isinstance(message, str), "a bad request got a normal reply"
                texts.append(message)
        except websockets.ConnectionClosed as e:
            assert e.rcvd is not None, "the server did not send a close frame"
            return texts, e.rcvd.code, e.rcvd.reason


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_gets_an_error_and_the_server_carries_on(case):
    make_frame, expected_code, expected_text = BAD_REQUESTS[case]
    rng = np.random.default_rng()
    with running_server(fake_policy, max_frame_bytes=SMALL_MAX_FRAME) as port:
        with connect(port) as (bystander, _):  # connected before, used after: must not notice anything
            obs = random_observation(rng)
            assert_reply_answers(infer(bystander, obs), obs)

            texts, code, reason = send_and_collect_error(port, make_frame(random_observation(rng)))

            assert code == expected_code
            if expected_code == 1011:  # openpi's convention: one text frame, then close 1011
                assert len(texts) == 1
                first_line = texts[0].splitlines()[0]
                assert first_line.startswith("bad request: ") and expected_text in first_line
                assert first_line.startswith(reason)  # the close reason repeats it, cut to 123 bytes
            else:  # websockets refuses the frame itself; no text frame can come first
                assert texts == [] and expected_text in reason

            assert http_get(port, "/healthz")[0] == 200
            obs = random_observation(rng)
            assert_reply_answers(infer(bystander, obs), obs)
            with connect(port) as (newcomer, _):
                obs = random_observation(rng)
                assert_reply_answers(infer(newcomer, obs), obs)


def _raise_value_error(obs: dict) -> dict:
    raise ValueError(f"boom with prompt of length {len(obs['prompt'])}")


@pytest.mark.parametrize(
    "policy, first_line",
    [
        (_raise_value_error, "policy failed: ValueError: boom with prompt of length "),
        (
            lambda obs: {"no_actions": 1},
            "policy failed: ValueError: the policy's output has no 'actions', only ['no_actions']",
        ),
        (lambda obs: [1.0], "policy failed: TypeError: the policy must return a dict, got list"),
        (lambda obs: {"actions": object()}, "policy failed: TypeError: cannot send a value of type object"),
    ],
)
def test_policy_failure_sends_traceback_and_server_carries_on(policy, first_line):
    rng = np.random.default_rng()
    with running_server(policy) as port:
        texts, code, reason = send_and_collect_error(port, pack(random_observation(rng)))
        assert code == 1011 and len(texts) == 1
        assert texts[0].startswith(first_line) and reason.startswith(first_line[:100])
        assert "Traceback (most recent call last)" in texts[0]
        assert http_get(port, "/healthz")[0] == 200
        texts, code, _ = send_and_collect_error(port, pack(random_observation(rng)))  # still serving
        assert code == 1011 and texts[0].startswith(first_line)


# --- concurrency ----------------------------------------------------------------------------------


def test_concurrent_clients_get_their_own_replies_and_policy_calls_never_overlap():
    n_clients, n_requests = 8, 5
    lock = threading.Lock()
    in_flight, max_in_flight, threads_used, calls = 0, 0, set(), 0

    def watched_policy(obs: dict) -> dict:
        nonlocal in_flight, max_in_flight, calls
        with lock:
            in_flight += 1
            max_in_flight = max(max_in_flight, in_flight)
            threads_used.add(threading.get_ident())
            calls += 1
        time.sleep(0.002)  # widen the window in which an overlapping call would be seen
        try:
            return fake_policy(obs)
        finally:
            with lock:
                in_flight -= 1

    failures: list[BaseException] = []

    def client(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            with connect(port) as (conn, _):
                for _ in range(n_requests):
                    obs = random_observation(rng)
                    assert_reply_answers(infer(conn, obs), obs)
        except BaseException as e:
            failures.append(e)

    seeds = np.random.SeedSequence().generate_state(n_clients)
    with running_server(watched_policy) as port:
        workers = [threading.Thread(target=client, args=(int(seed),)) for seed in seeds]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(60)
        assert not any(worker.is_alive() for worker in workers)
    assert not failures, failures
    assert calls == n_clients * n_requests
    assert max_in_flight == 1 and len(threads_used) == 1


def test_server_stays_responsive_while_the_policy_runs():
    entered, release = threading.Event(), threading.Event()

    def blocking_policy(obs: dict) -> dict:
        entered.set()
        assert release.wait(TIMEOUT_S)
        return fake_policy(obs)

    rng = np.random.default_rng()
    with running_server(blocking_policy) as port:
        with connect(port) as (first, _):
            first_obs = random_observation(rng)
            first.send(pack(first_obs))
            assert entered.wait(TIMEOUT_S)
            # The policy is busy: health checks and new connections must still be answered.
            assert http_get(port, "/healthz")[0] == 200
            with connect(port) as (second, metadata):
                assert metadata["policy"] == "fake-libero"
                second_obs = random_observation(rng)
                second.send(pack(second_obs))
                release.set()
                assert_reply_answers(unpack(first.recv(timeout=TIMEOUT_S)), first_obs)
                assert_reply_answers(unpack(second.recv(timeout=TIMEOUT_S)), second_obs)


def test_sigint_stops_the_server_cleanly():
    port = free_port()
    code = (
        CTRL_C_HONOURED +
        "from pi_build.runtime.serve import serve\n"
        f"serve(lambda obs: {{'actions': obs['observation/state']}}, port={port}, metadata={{'policy': 'echo'}})\n"
        "print('returned')\n"
    )
    server = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:  # wait for the subprocess to listen
            with contextlib.suppress(OSError):
                if http_get(port, "/healthz")[0] == 200:
                    break
            assert time.monotonic() < deadline and server.poll() is None, server.stderr.read() if server.stderr else ""
            time.sleep(0.05)
        with connect(port) as (conn, metadata):
            assert metadata == {"policy": "echo"}
            server.send_signal(signal.SIGINT)
            with pytest.raises(websockets.ConnectionClosed) as closed:
                conn.recv(timeout=TIMEOUT_S)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001  # "going away"
        stdout, stderr = server.communicate(timeout=TIMEOUT_S)
        assert server.returncode == 0, stderr
        assert stdout == "returned\n"
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(TIMEOUT_S)


def test_serves_the_real_policy_over_built_engines(workspace):
    """The runtime's Policy over the tiny engines behind the server: LIBERO actions come back."""
    from pi_build.transforms.libero import load_recorded_observations
    from pi_build.runtime.policy import load_policy
    from pi_build.runtime.pipeline import load_pipeline
    from pi_build.recipe import load_recipe

    policy = load_policy(load_pipeline(workspace["engines"], load_recipe(workspace["recipe"]), "cpu"))
    observations = load_recorded_observations()[:2]
    with running_server(policy) as port, connect(port) as (conn, metadata):
        assert set(metadata) == set(METADATA)
        for obs in observations:
            request = {k: obs[k] for k in ("observation/image", "observation/wrist_image", "observation/state", "prompt")}
            reply = infer(conn, request)
            assert reply["actions"].shape == (10, 7) and np.isfinite(reply["actions"]).all()
            assert reply["server_timing"]["infer_ms"] > 0 and reply["policy_timing"]["infer_ms"] > 0


def test_pi_run_serve_cli_answers_health_and_requests(workspace):
    """`pi-run serve` as users start it: a process on loopback with the API key in PI_BUILD_API_KEY and
    --max-batch above what the batch-1 engines hold; /healthz, /metrics, one LIBERO request, Ctrl-C."""
    from pi_build.transforms.libero import load_recorded_observations

    port = free_port()
    cmd = [sys.executable, "-c", CTRL_C_HONOURED + "from pi_build.cli.run import app; app()", "serve", "--recipe", str(workspace["recipe"]),
           "--engines", str(workspace["engines"]), "--port", str(port), "--device", "cpu",
           "--max-batch", "4", "--max-wait-ms", "2"]
    env = {**os.environ, "PI_BUILD_API_KEY": "from-the-environment"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if http_get(port, "/healthz")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.5)
        obs = load_recorded_observations()[0]
        request = {k: obs[k] for k in ("observation/image", "observation/wrist_image", "observation/state", "prompt")}
        assert_refused_for_its_key(port, None)
        with connect(port, api_key="from-the-environment") as (conn, metadata):
            assert metadata["model_id"] == "t" and metadata["horizon"] == 10
            reply = infer(conn, request)
        assert reply["actions"].shape == (10, 7)
        assert reply["server_timing"]["batch_size"] == 1
        assert http_get(port, "/metrics")[0] == 401
        status, text = http_get(port, "/metrics", api_key="from-the-environment")
        assert status == 200 and "pi_build_serve_refused_connections_total 1.0" in text
    finally:
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 0, output
    assert "batches of up to 1;" in output  # the engines hold one request: --max-batch 4 is capped, and says so
    assert "max_batch 4 asked, but the policy takes at most 1 requests per call" in output


# --- what a user meets: ports, keys, exposure, long prompts (issue 9) ----------------------------------


def test_a_port_in_use_is_one_clear_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        expected = (f"port {port} on 127.0.0.1 is already in use (another pi-run serve?): "
                    "stop that process, or pick a free port with --port")
        with pytest.raises(ServeError) as raised:
            serve(fake_policy, port=port, metadata=METADATA)
        assert str(raised.value) == expected
        with pytest.raises(ServeError) as raised:
            check_can_listen("127.0.0.1", port)
        assert str(raised.value) == expected
    check_can_listen("127.0.0.1", port)  # free again: no error


def test_an_address_not_of_this_machine_is_one_clear_error():
    with pytest.raises(ServeError, match=r"^192\.0\.2\.1 is not an address of this machine: use 127\.0\.0\.1"):
        check_can_listen("192.0.2.1", free_port())  # TEST-NET-1: never a local address


def test_pi_run_serve_says_the_port_is_in_use_in_one_line_before_loading_engines():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "pi_build.cli.run", "serve", "--model-id", "no-such-model",
                                 "--engines", "/nonexistent", "--port", str(port)],
                                capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stdout == ""  # nothing was loaded
    assert result.stderr == (f"error: port {port} on 127.0.0.1 is already in use (another pi-run serve?): "
                             "stop that process, or pick a free port with --port\n")


# Only the start of typer's message: its wording after the option name changes between typer versions.
@pytest.mark.parametrize(
    "args, message",
    [
        (["--port", "-1"], "Invalid value for '--port'"),
        (["--port", "65536"], "Invalid value for '--port'"),
        (["--port", "http"], "Invalid value for '--port'"),
        (["--max-batch", "0"], "Invalid value for '--max-batch'"),
        (["--max-wait-ms", "-1"], "Invalid value for '--max-wait-ms'"),
        (["--api-key", " "], "Invalid value for --api-key: the key is empty: give one, or unset PI_BUILD_API_KEY"),
    ],
)
def test_pi_run_serve_refuses_bad_options_before_any_work(args, message):
    from typer.testing import CliRunner

    from pi_build.cli.run import app

    result = CliRunner().invoke(app, ["serve", "--model-id", "no-such-model", *args])
    assert result.exit_code == 2
    flat = " ".join(line.strip(" │╭╮╰╯─") for line in result.output.splitlines())  # rich draws a box around it
    assert message in " ".join(flat.split())
    assert "Traceback" not in result.output and "loading" not in result.output


WRONG_KEY_REASON = "missing or wrong API key: connect with this server's key (openpi-client: api_key=KEY)"


def assert_refused_for_its_key(port: int, api_key: str | None, authorization: str | None = None) -> None:
    """A connection with this key (or this raw Authorization header) is closed with 1008 and the reason."""
    headers = {"Authorization": authorization} if authorization is not None else api_key_header(api_key)
    with websockets.sync.client.connect(f"ws://127.0.0.1:{port}", additional_headers=headers,
                                        open_timeout=TIMEOUT_S) as conn:
        with pytest.raises(websockets.ConnectionClosed) as closed:
            conn.recv(timeout=TIMEOUT_S)  # no metadata: the close comes first
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1008, WRONG_KEY_REASON)


def test_an_api_key_refuses_other_connections_with_a_clear_reason():
    rng = np.random.default_rng()
    with running_server(fake_policy, api_key="s3cret") as port:
        assert_refused_for_its_key(port, None)
        assert_refused_for_its_key(port, "wrong")
        assert_refused_for_its_key(port, "s3cre")
        assert_refused_for_its_key(port, "S3CRET")
        assert_refused_for_its_key(port, None, authorization="Bearer s3cret")  # openpi's scheme is Api-Key
        with connect(port, api_key="s3cret") as (conn, metadata):
            assert metadata["policy"] == "fake-libero"
            obs = random_observation(rng)
            assert_reply_answers(infer(conn, obs), obs)
        assert http_get(port, "/healthz")[0] == 200  # health checks need no key
        deadline = time.monotonic() + TIMEOUT_S  # a handler counts its request after sending the reply
        while "pi_build_serve_connections 0.0" not in http_get(port, "/metrics", api_key="s3cret")[1]:
            assert time.monotonic() < deadline, "the connection did not end"
            time.sleep(0.01)
        status, text = http_get(port, "/metrics")
        assert status == 401 and "missing or wrong API key" in text
        status, text = http_get(port, "/metrics", api_key="s3cret")
        assert status == 200
        assert "pi_build_serve_refused_connections_total 5.0" in text
        assert 'pi_build_serve_requests_total{outcome="ok"} 1.0' in text


@pytest.mark.slow
def test_openpi_client_sends_its_api_key_and_hears_why_a_wrong_one_is_refused(openpi_client_python, tmp_path):
    rng = np.random.default_rng()
    observations = [random_observation(rng, np.float64) for _ in range(2)]
    np.savez(tmp_path / "obs.npz", image=np.stack([o["observation/image"] for o in observations]),
             wrist_image=np.stack([o["observation/wrist_image"] for o in observations]),
             state=np.stack([o["observation/state"] for o in observations]),
             prompt=np.array([o["prompt"] for o in observations]))
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}

    def openpi_client(port: int, *args: str) -> dict:
        result = subprocess.run([str(openpi_client_python), str(REPO / "scripts" / "openpi_client_check.py"),
                                 "--host", "127.0.0.1", "--port", str(port), "--observations", str(tmp_path / "obs.npz"),
                                 *args], capture_output=True, text=True, timeout=60, env=env)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    with running_server(fake_policy, api_key="s3cret") as port:
        wrong = openpi_client(port, "--api-key", "wrong")
        missing = openpi_client(port)
        right = openpi_client(port, "--api-key", "s3cret")
    for refused in (wrong, missing):
        assert set(refused) == {"connect_error"}
        assert "1008" in refused["connect_error"] and WRONG_KEY_REASON in refused["connect_error"]
    for reply, obs in zip(from_json(right["replies"]), observations, strict=True):
        assert_reply_answers(reply, obs)


@pytest.mark.parametrize(
    "host, api_key, warns",
    [("127.0.0.1", None, False), ("localhost", None, False), ("::1", None, False), ("127.0.0.2", None, False),
     ("0.0.0.0", None, True), ("::", None, True), ("192.168.1.20", None, True), ("robot-host", None, True),
     ("0.0.0.0", "s3cret", False)],
)
def test_exposure_warning_for_servers_reachable_from_elsewhere_without_a_key(host, api_key, warns):
    warning = exposure_warning(host, 8000, api_key)
    if warns:
        assert warning == (f"serving on {host}:8000 without an API key: anyone who can reach this machine can use "
                           "the policy; set one with --api-key or PI_BUILD_API_KEY (openpi-client: api_key=KEY)")
    else:
        assert warning is None


@pytest.mark.parametrize("api_key", [None, "s3cret"])
def test_serving_on_all_interfaces_warns_without_a_key(api_key, caplog):
    port = free_port()
    ready, stop = threading.Event(), threading.Event()
    thread = threading.Thread(target=serve, args=(fake_policy,), daemon=True,
                              kwargs=dict(host="0.0.0.0", port=port, metadata=METADATA, api_key=api_key,
                                          ready=ready, stop=stop))
    with caplog.at_level("WARNING", logger="pi_build.runtime.serve"):
        thread.start()
        try:
            assert ready.wait(TIMEOUT_S)
        finally:
            stop.set()  # listen on every interface no longer than needed
            thread.join(TIMEOUT_S)
    assert not thread.is_alive()
    warned = [r.getMessage() for r in caplog.records if "without an API key" in r.getMessage()]
    assert warned == ([f"serving on 0.0.0.0:{port} without an API key: anyone who can reach this machine can use "
                       "the policy; set one with --api-key or PI_BUILD_API_KEY (openpi-client: api_key=KEY)"]
                      if api_key is None else [])


LONG_PROMPT = "pick up the black bowl and place it on the plate, " * 2000  # 100 000 characters


@pytest.mark.slow
def test_an_over_long_prompt_is_refused_never_cut(workspace, openpi_client_python, tmp_path):
    """The engines take 200 tokens: a 100 000-character prompt is refused with an error that our client and
    openpi's client both show, and the server goes on serving."""
    from pi_build.transforms.libero import load_recorded_observations
    from pi_build.errors import InputError
    from pi_build.runtime.policy import load_policy
    from pi_build.runtime.pipeline import load_pipeline
    from pi_build.recipe import load_recipe

    assert len(LONG_PROMPT) == 100_000
    policy = load_policy(load_pipeline(workspace["engines"], load_recipe(workspace["recipe"]), "cpu"))
    obs = load_recorded_observations()[0]
    request = {k: obs[k] for k in ("observation/image", "observation/wrist_image", "observation/state")}
    n_tokens = len(policy.transforms.tokenizer.token_ids(LONG_PROMPT))
    message = (f"prompt too long: its 100000 characters make {n_tokens} tokens, more than the 200 these engines "
               "take (recipe model.prompt_len); send a shorter prompt")
    with pytest.raises(InputError) as raised:
        policy({**request, "prompt": LONG_PROMPT})
    assert str(raised.value) == message

    np.savez(tmp_path / "long.npz", image=request["observation/image"][None],
             wrist_image=request["observation/wrist_image"][None], state=request["observation/state"][None],
             prompt=np.array([LONG_PROMPT]))
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    with running_server(policy) as port:
        texts, code, reason = send_and_collect_error(port, pack({**request, "prompt": LONG_PROMPT}))
        assert code == 1011 and texts == [f"bad request: {message}"]
        assert reason == f"bad request: {message}"[:123]
        result = subprocess.run([str(openpi_client_python), str(REPO / "scripts" / "openpi_client_check.py"),
                                 "--host", "127.0.0.1", "--port", str(port), "--observations", str(tmp_path / "long.npz")],
                                capture_output=True, text=True, timeout=60, env=env)
        assert result.returncode == 0, result.stderr
        (openpi_reply,) = json.loads(result.stdout)["replies"]
        assert openpi_reply == {"error": f"Error in inference server:\nbad request: {message}"}
        with connect(port) as (conn, _):  # and the server carries on
            reply = infer(conn, {**request, "prompt": obs["prompt"]})
        assert reply["actions"].shape == (10, 7)
