"""Websocket policy server speaking openpi's protocol, so openpi's own client (`openpi-client`) works unchanged.

Protocol (see openpi's websocket_policy_server.py and openpi_client/msgpack_numpy.py):
- A client connects; the server first sends one binary frame: the metadata dict, msgpack'd.
- Then, per request: the client sends one binary msgpack frame (the observation dict), the server
  answers with one binary msgpack frame (the policy's output plus `server_timing`).
- numpy arrays travel as maps {b"__ndarray__": True, b"data": raw bytes, b"dtype": dtype.str,
  b"shape": [...]}; numpy scalars as {b"__npgeneric__": True, b"data": value, b"dtype": dtype.str}.
- On an error the server sends a text frame (a one-line message, then details) and closes the
  connection with code 1011; openpi's client raises when it receives text. A frame larger than
  `max_frame_bytes` is refused by websockets itself with close code 1009.
- `GET /healthz` answers 200 on the same port.

The policy is called on one dedicated thread, one request at a time: a model runtime is rarely
thread-safe, and GPU state (current stream, captured CUDA graphs) is easiest to keep on one thread.
The event loop stays free meanwhile, so /healthz and other connections are answered while a
request is being computed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import http
import logging
import math
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from typing import Any

import msgpack
import numpy as np
import websockets
from websockets.asyncio.server import Request, Response, ServerConnection
from websockets.asyncio.server import serve as websockets_serve
from websockets.frames import CloseCode

logger = logging.getLogger(__name__)

Policy = Callable[[dict], dict]

# A LIBERO request is ~0.3 MB (two 224x224x3 uint8 images); 16 MiB leaves room for more and larger
# cameras while still refusing a runaway client before it fills memory.
DEFAULT_MAX_FRAME_BYTES = 16 * 2**20

# The close reason of a websocket close frame may hold at most 123 bytes of UTF-8.
_MAX_CLOSE_REASON_BYTES = 123

# How often serve() looks at its `stop` event. A threading.Event can be set from any thread;
# looking at it now and then is simpler than bridging it into the event loop.
_STOP_POLL_S = 0.05


# ---------------------------------------------------------------------------------------------
# msgpack with numpy arrays (wire-compatible with openpi_client.msgpack_numpy)
# ---------------------------------------------------------------------------------------------

# Object arrays would need pickle, which must never run on bytes from the network; structured
# (void) and complex dtypes are refused as openpi refuses them.
_REFUSED_DTYPE_KINDS = ("O", "V", "c")


def _encode_numpy(obj: Any) -> Any:
    if isinstance(obj, (np.ndarray, np.generic)) and obj.dtype.kind in _REFUSED_DTYPE_KINDS:
        raise TypeError(f"cannot send numpy dtype {obj.dtype}")
    if isinstance(obj, np.ndarray):
        return {b"__ndarray__": True, b"data": obj.tobytes(), b"dtype": obj.dtype.str, b"shape": obj.shape}
    if isinstance(obj, np.generic):
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    raise TypeError(f"cannot send a value of type {type(obj).__name__}")


def _decode_numpy(obj: dict) -> Any:
    if b"__ndarray__" in obj:
        dtype = _wire_dtype(obj[b"dtype"])
        shape = tuple(obj[b"shape"])
        data = obj[b"data"]
        expected_bytes = math.prod(shape) * dtype.itemsize
        if not isinstance(data, bytes) or len(data) != expected_bytes:
            raise ValueError(f"array of dtype {dtype} and shape {shape} needs {expected_bytes} bytes of data")
        # A read-only view of the frame's bytes, as openpi's client and server produce.
        return np.ndarray(buffer=data, dtype=dtype, shape=shape)
    if b"__npgeneric__" in obj:
        return _wire_dtype(obj[b"dtype"]).type(obj[b"data"])
    return obj


def _wire_dtype(dtype_str: Any) -> np.dtype:
    dtype = np.dtype(str(dtype_str))
    if dtype.kind in _REFUSED_DTYPE_KINDS:
        raise ValueError(f"numpy dtype {dtype} is not accepted")
    return dtype


def pack(obj: Any) -> bytes:
    """msgpack `obj`, with numpy arrays and scalars encoded the way openpi's client expects."""
    return msgpack.packb(obj, default=_encode_numpy)


def unpack(data: bytes) -> Any:
    """Inverse of `pack`; also reads frames packed by openpi_client.msgpack_numpy."""
    return msgpack.unpackb(data, object_hook=_decode_numpy)


# ---------------------------------------------------------------------------------------------
# Request validation
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ArraySpec:
    """What one numpy array in a request must look like."""

    shape: tuple[int, ...]
    dtypes: tuple[str, ...]  # accepted numpy dtype names, e.g. ("uint8",)
    finite: bool = False  # refuse NaN and inf


# A request spec maps each required key to an ArraySpec, or to `str` for a text field.
# Keys not in the spec are passed to the policy untouched.
RequestSpec = Mapping[str, "ArraySpec | type[str]"]

# What openpi's LIBERO example client sends (examples/libero/main.py): both cameras resized with
# padding to 224x224 uint8 on the client, state = eef position (3) + axis-angle (3) + gripper (2).
LIBERO_REQUEST_SPEC: RequestSpec = {
    "observation/image": ArraySpec((224, 224, 3), ("uint8",)),
    "observation/wrist_image": ArraySpec((224, 224, 3), ("uint8",)),
    "observation/state": ArraySpec((8,), ("float32", "float64"), finite=True),
    "prompt": str,
}


class BadRequest(ValueError):
    """A request the server refuses before the policy sees it; the message names the problem."""


def validate_request(request: Any, spec: RequestSpec) -> None:
    """Raise BadRequest naming the first key that does not match `spec`."""
    if not isinstance(request, dict):
        raise BadRequest(f"request must be a map of observation keys, got {type(request).__name__}")
    missing = [key for key in spec if key not in request]
    if missing:
        raise BadRequest(f"missing key(s) {missing}; this server needs {sorted(spec)}")
    for key, expected in spec.items():
        value = request[key]
        if expected is str:
            if not isinstance(value, str):
                raise BadRequest(f"'{key}' must be a string, got {type(value).__name__}")
            continue
        if not isinstance(value, np.ndarray):
            raise BadRequest(
                f"'{key}' must be a numpy array of shape {expected.shape} and dtype "
                f"{' or '.join(expected.dtypes)}, got {type(value).__name__}"
            )
        if value.shape != expected.shape:
            raise BadRequest(f"'{key}' has shape {value.shape}, expected {expected.shape}")
        if value.dtype.name not in expected.dtypes:
            raise BadRequest(f"'{key}' has dtype {value.dtype.name}, expected {' or '.join(expected.dtypes)}")
        if expected.finite and not np.isfinite(value).all():
            bad = np.flatnonzero(~np.isfinite(value)).tolist()
            raise BadRequest(f"'{key}' has non-finite values (NaN or inf) at flat indices {bad}")


def decode_request(frame: str | bytes, spec: RequestSpec) -> dict:
    """One websocket frame from a client -> the observation dict, or BadRequest."""
    if isinstance(frame, str):
        raise BadRequest("expected a binary msgpack frame, got a text frame")
    try:
        request = unpack(frame)
    except Exception as e:  # msgpack raises several unrelated types for bad bytes
        raise BadRequest(f"frame is not valid msgpack with numpy arrays ({type(e).__name__}: {e})") from e
    validate_request(request, spec)
    return request


# ---------------------------------------------------------------------------------------------
# Server
# ---------------------------------------------------------------------------------------------


def _call_policy_timed(policy: Policy, request: dict, submitted_at: float) -> tuple[dict, float, float]:
    """Runs on the policy thread; returns (output, ms waiting for the thread, ms inside the policy)."""
    started_at = time.perf_counter()
    output = policy(request)
    infer_ms = (time.perf_counter() - started_at) * 1000
    if not isinstance(output, dict):
        raise TypeError(f"the policy must return a dict, got {type(output).__name__}")
    if "actions" not in output:
        raise ValueError(f"the policy's output has no 'actions', only {sorted(output)}")
    return output, (started_at - submitted_at) * 1000, infer_ms


async def _send_error(connection: ServerConnection, message: str, details: str = "") -> None:
    """openpi's error convention: a text frame, then close 1011. The first line says what went wrong."""
    text = message if not details else f"{message}\n{details}"
    reason = message.encode()[:_MAX_CLOSE_REASON_BYTES].decode(errors="ignore")
    try:
        await connection.send(text)
        await connection.close(CloseCode.INTERNAL_ERROR, reason)
    except websockets.ConnectionClosed:
        pass


async def _serve_connection(
    connection: ServerConnection,
    *,
    policy: Policy,
    policy_thread: concurrent.futures.Executor,
    metadata_frame: bytes,
    request_spec: RequestSpec,
) -> None:
    client = connection.remote_address
    logger.info("client %s connected", client)
    loop = asyncio.get_running_loop()
    prev_total_ms: float | None = None
    try:
        await connection.send(metadata_frame)
        while True:
            frame = await connection.recv()
            received_at = time.perf_counter()
            try:
                request = decode_request(frame, request_spec)
            except BadRequest as e:
                logger.warning("client %s: bad request: %s", client, e)
                await _send_error(connection, f"bad request: {e}")
                return
            try:
                output, queue_ms, infer_ms = await loop.run_in_executor(
                    policy_thread, _call_policy_timed, policy, request, time.perf_counter()
                )
                server_timing = {"infer_ms": infer_ms, "queue_ms": queue_ms}
                if prev_total_ms is not None:
                    # Receive to end of send, known only once the reply is out: reported one request late.
                    server_timing["prev_total_ms"] = prev_total_ms
                reply_frame = pack({**output, "server_timing": server_timing})
            except Exception as e:
                logger.exception("client %s: policy failed", client)
                await _send_error(connection, f"policy failed: {type(e).__name__}: {e}", traceback.format_exc())
                return
            await connection.send(reply_frame)
            prev_total_ms = (time.perf_counter() - received_at) * 1000
    except websockets.ConnectionClosed as e:
        # Also how an oversized frame ends: websockets has already closed with 1009.
        logger.info("client %s disconnected: %s", client, e)


def _answer_health_check(connection: ServerConnection, request: Request) -> Response | None:
    if request.path.split("?")[0] == "/healthz":
        return connection.respond(http.HTTPStatus.OK, "OK\n")
    return None  # go on with the websocket handshake


async def serve_async(
    policy: Policy,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    metadata: dict,
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    request_spec: RequestSpec = LIBERO_REQUEST_SPEC,
    ready: threading.Event | None = None,
    stop: threading.Event | None = None,
) -> None:
    """The server as a coroutine; returns once `stop` is set (never, without one)."""
    metadata_frame = pack(metadata)  # fail here, not on the first client, if metadata cannot be sent
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="policy") as policy_thread:
        handler = functools.partial(
            _serve_connection,
            policy=policy,
            policy_thread=policy_thread,
            metadata_frame=metadata_frame,
            request_spec=request_spec,
        )
        async with websockets_serve(
            handler,
            host,
            port,
            compression=None,
            max_size=max_frame_bytes,
            process_request=_answer_health_check,
        ):
            logger.info("serving on ws://%s:%d (GET /healthz for a health check)", host, port)
            if ready is not None:
                ready.set()
            while stop is None or not stop.is_set():
                await asyncio.sleep(_STOP_POLL_S)
        logger.info("server stopped")


def serve(
    policy: Policy,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    metadata: dict,
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    request_spec: RequestSpec = LIBERO_REQUEST_SPEC,
    ready: threading.Event | None = None,
    stop: threading.Event | None = None,
) -> None:
    """Serve `policy` over openpi's websocket protocol until `stop` is set or SIGINT arrives.

    `policy(observation) -> {"actions": np.ndarray, ...}` is called on one thread, one request at a
    time; the reply adds `server_timing` = {"infer_ms", "queue_ms", "prev_total_ms" from the second
    request on}. Requests are checked against `request_spec` before the policy runs. `ready` is set
    once the port is listening. Run it in a thread and set `stop` to end it from another thread.
    """
    try:
        asyncio.run(
            serve_async(
                policy,
                host=host,
                port=port,
                metadata=metadata,
                max_frame_bytes=max_frame_bytes,
                request_spec=request_spec,
                ready=ready,
                stop=stop,
            )
        )
    except KeyboardInterrupt:  # asyncio.run has already closed the server and its connections
        logger.info("server stopped by SIGINT")
