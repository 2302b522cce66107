"""Talk to a pi-build policy server through openpi's own client (`openpi-client` from PyPI), unchanged.

Runs inside a separate venv that has openpi-client installed (it pins numpy<2, so it cannot live in
pi-build's venv); tests/test_serve.py creates that venv and runs this script. Usage:

    python scripts/openpi_client_check.py --host 127.0.0.1 --port 8000 --observations obs.npz

obs.npz holds N LIBERO observations: image and wrist_image [N, 224, 224, 3] uint8, state [N, 8],
prompt [N] (unicode). The script sends them in order over one connection, then sends the first one
again with a NaN in the state over a second connection, and prints one JSON object:
{"metadata": ..., "replies": [...], "bad_request_error": the text of the error the client raised}.
numpy values are written as {"ndarray": dtype, "shape": [...], "values": [...]} and
{"npgeneric": dtype, "value": ...} so the caller can check dtypes as well as values.
"""

import argparse
import json

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
    return {
        "observation/image": arrays["image"][i],
        "observation/wrist_image": arrays["wrist_image"][i],
        "observation/state": arrays["state"][i],
        "prompt": str(arrays["prompt"][i]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--observations", required=True, help=".npz file of LIBERO observations")
    args = parser.parse_args()

    arrays = np.load(args.observations)
    client = WebsocketClientPolicy(args.host, args.port)
    replies = [client.infer(libero_observation(arrays, i)) for i in range(len(arrays["state"]))]

    bad = libero_observation(arrays, 0)
    bad["observation/state"] = bad["observation/state"].copy()
    bad["observation/state"][3] = np.nan
    try:
        WebsocketClientPolicy(args.host, args.port).infer(bad)
        bad_request_error = None
    except RuntimeError as e:  # openpi's client raises RuntimeError when the server answers with text
        bad_request_error = str(e)

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
