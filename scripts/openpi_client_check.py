"""Talk to a pi-build policy server through openpi's own client (`openpi-client` from PyPI), unchanged.

Runs inside a separate venv that has openpi-client installed (it pins numpy<2, so it cannot live in
pi-build's venv); tests/test_serve.py creates that venv and runs this script. Usage:

    python scripts/openpi_client_check.py --host 127.0.0.1 --port 8000 --observations obs.npz
        [--api-key KEY] [--concurrent]

obs.npz holds N LIBERO observations: image and wrist_image [N, 224, 224, 3] uint8, state [N, 8],
prompt [N] (unicode), and optionally noise_seed [N] (integers, sent as each request's noise_seed).
The script sends them in order over one connection, or with --concurrent from N clients at once
(one thread and one connection each, all connected before any sends). Then it sends the first
observation again with a NaN in the state over a new connection. It prints one JSON object:
{"metadata": ..., "replies": [...], "bad_request_error": the text of the error the client raised},
where a request the server refused appears in "replies" as {"error": the client's error text}; or,
when the first connection fails (a wrong API key), {"connect_error": the client's error text}.
numpy values are written as {"ndarray": dtype, "shape": [...], "values": [...]} and
{"npgeneric": dtype, "value": ...} so the caller can check dtypes as well as values.
"""

import argparse
import json
import threading

import numpy as np
from openpi_client.websocket_client_policy import WebsocketClientPolicy


def to_json(obj):
    if isinstance(obj, np.ndarray):
        return {"ndarray": obj.dtype.str, "shape": list(obj.shape), "values": obj.tolist()}
    if isinstance(obj, np.generic):
        return {"npgeneric": obj.dtype.str, "value": obj.item()}
    if isinstance(obj, dict):
        return {str(key): to_json(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json(value) for value in obj]
    return obj


def libero_observation(arrays, i: int) -> dict:
    obs = {
        "observation/image": arrays["image"][i],
        "observation/wrist_image": arrays["wrist_image"][i],
        "observation/state": arrays["state"][i],
        "prompt": str(arrays["prompt"][i]),
    }
    if "noise_seed" in arrays:
        obs["noise_seed"] = int(arrays["noise_seed"][i])
    return obs


def infer_or_error(client: WebsocketClientPolicy, obs: dict) -> dict:
    try:
        return client.infer(obs)
    except RuntimeError as e:  # openpi's client raises RuntimeError when the server answers with text
        return {"error": str(e)}


def infer_concurrently(connect, observations: list) -> list:
    """One client per observation, each on its own thread; all connect before any of them sends."""
    replies = [None] * len(observations)
    all_connected = threading.Barrier(len(observations))

    def one_client(i: int) -> None:
        client = connect()
        all_connected.wait(timeout=60)
        replies[i] = infer_or_error(client, observations[i])

    threads = [threading.Thread(target=one_client, args=(i,)) for i in range(len(observations))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return replies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--observations", required=True, help=".npz file of LIBERO observations")
    parser.add_argument("--api-key", default=None, help="sent by openpi's client as `Authorization: Api-Key KEY`")
    parser.add_argument("--concurrent", action="store_true", help="one client per observation, all at once")
    args = parser.parse_args()

    arrays = np.load(args.observations)
    observations = [libero_observation(arrays, i) for i in range(len(arrays["state"]))]

    def connect() -> WebsocketClientPolicy:
        return WebsocketClientPolicy(args.host, args.port, api_key=args.api_key)

    try:
        client = connect()
    except Exception as e:  # the server closed the connection before sending its metadata
        print(json.dumps({"connect_error": f"{type(e).__name__}: {e}"}))
        return
    if args.concurrent:
        replies = infer_concurrently(connect, observations)
    else:
        replies = [infer_or_error(client, obs) for obs in observations]

    bad = dict(observations[0])
    bad["observation/state"] = bad["observation/state"].copy()
    bad["observation/state"][3] = np.nan
    bad_request_error = infer_or_error(connect(), bad).get("error")

    print(
        json.dumps(
            {
                "metadata": to_json(client.get_server_metadata()),
                "replies": to_json(replies),
                "bad_request_error": bad_request_error,
            }
        )
    )


if __name__ == "__main__":
    main()
