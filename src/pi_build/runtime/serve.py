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
- With an API key, a client must send the header `Authorization: Api-Key <key>` (what
  openpi-client's `WebsocketClientPolicy(..., api_key=KEY)` sends); any other connection is closed
  with code 1008 (policy violation) and a reason saying so, before the metadata.
- `GET /healthz` answers 200 on the same port; `GET /metrics` answers the server's metrics in the
  Prometheus text format (with an API key, it asks for the same header).

Dynamic batching: the requests of concurrent clients are gathered into one batched policy call.
A batch closes when it holds `max_batch` requests, or `max_wait_ms` after its first request
arrived. Each request is validated and prepared (`BatchPolicy.prepare`, see batching.py) before
it joins a batch, so a bad request gets its own error and never fails its batch-mates.

Threads: the batched policy call runs on one dedicated thread, one batch at a time: a model runtime
is rarely thread-safe, and GPU state (current stream, captured CUDA graphs) is easiest to keep on
one thread. Preparation runs on a second thread, so the next batch is prepared while one runs. The
event loop stays free meanwhile: /healthz, /metrics and other connections are answered while a
batch is being computed.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import errno
import functools
import hmac
import http
import inspect
import ipaddress
import logging
import math
import socket
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import msgpack
import numpy as np
import websockets
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder
from websockets.asyncio.server import Request, Response, ServerConnection
from websockets.asyncio.server import serve as websockets_serve
from websockets.frames import CloseCode

from pi_build.runtime.batching import BatchPolicy, as_batch_policy
from pi_build.errors import InputError, ServeError

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

# openpi-client sends its api_key as `Authorization: Api-Key <key>` (websocket_client_policy.py).
API_KEY_SCHEME = "Api-Key"
_WRONG_API_KEY_REASON = "missing or wrong API key: connect with this server's key (openpi-client: api_key=KEY)"


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


class BadRequest(InputError):
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
# Metrics
# ---------------------------------------------------------------------------------------------

# Policy latencies run from about a millisecond (small engines on a GPU) to seconds (CPU).
_LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# ok: answered; bad_request: refused before inference (the client must fix it); error: the policy
# failed; disconnected: the client left before its reply could be sent.
REQUEST_OUTCOMES = ("ok", "bad_request", "error", "disconnected")


def _batch_size_buckets(max_batch: int) -> tuple[int, ...]:
    """Powers of two below max_batch, and max_batch itself: the sizes a batched engine is usually built for."""
    powers = [2**i for i in range(max_batch.bit_length()) if 2**i < max_batch]
    return (*powers, max_batch)


class ServerMetrics:
    """The server's Prometheus metrics, in a registry of its own so that two servers never mix their counts."""

    def __init__(self, max_batch: int):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("pi_build_serve_requests", "Requests, by outcome: " + ", ".join(REQUEST_OUTCOMES),
                                ["outcome"], registry=r)
        for outcome in REQUEST_OUTCOMES:  # every outcome is listed from the start, at 0
            self.requests.labels(outcome)
        self.refused_connections = Counter("pi_build_serve_refused_connections",
                                           "Connections closed for a missing or wrong API key", registry=r)
        self.batch_size = Histogram("pi_build_serve_batch_size", "Requests per batched policy call",
                                    buckets=_batch_size_buckets(max_batch), registry=r)
        self.queue_seconds = Histogram("pi_build_serve_queue_seconds",
                                       "Per request: from its arrival to the start of its batch",
                                       buckets=_LATENCY_BUCKETS_S, registry=r)
        self.inference_seconds = Histogram("pi_build_serve_inference_seconds", "Per batch: the batched policy call",
                                           buckets=_LATENCY_BUCKETS_S, registry=r)
        self.request_seconds = Histogram("pi_build_serve_request_seconds",
                                         "Per answered request: from its arrival to the end of sending its reply",
                                         buckets=_LATENCY_BUCKETS_S, registry=r)
        self.queued_requests = Gauge("pi_build_serve_queued_requests", "Prepared requests waiting for a batch",
                                     registry=r)
        self.connections = Gauge("pi_build_serve_connections", "Open client connections", registry=r)

    def exposition(self, accept_header: str) -> tuple[bytes, str]:
        """The metrics as the client's Accept header asks (Prometheus text by default) and their content type."""
        encode, content_type = choose_encoder(accept_header)
        return encode(self.registry), content_type


# ---------------------------------------------------------------------------------------------
# Dynamic batching
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BatchedReply:
    """One request's share of a batch: its reply and the timing of its batch."""

    output: dict
    queue_ms: float  # from the request's arrival to the start of its batch
    infer_ms: float  # the batched policy call
    batch_size: int


@dataclasses.dataclass
class _WaitingRequest:
    item: Any  # what the policy's prepare() returned
    received_at: float  # time.perf_counter() when its frame arrived
    reply: asyncio.Future[BatchedReply]


class _RequestFailed(Exception):
    """A request that gets an error frame instead of a reply; the connection is closed after it.

    Made once per failure, with the traceback already formatted: a batch's failure is handed to each
    of its requests, and re-raising one exception object in several places would mix their tracebacks.
    """

    def __init__(self, message: str, details: str, outcome: str):
        super().__init__(message)
        self.message, self.details, self.outcome = message, details, outcome


def _policy_failure(e: Exception) -> _RequestFailed:
    # An internal error: the traceback goes to the client, as openpi's server does.
    details = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    return _RequestFailed(f"policy failed: {type(e).__name__}: {e}", details, "error")


def _check_reply(output: Any) -> None:
    if not isinstance(output, dict):
        raise TypeError(f"the policy must return a dict, got {type(output).__name__}")
    if "actions" not in output:
        raise ValueError(f"the policy's output has no 'actions', only {sorted(output)}")


def _run_batch_timed(policy: BatchPolicy, items: list[Any]) -> tuple[list[Any], float, float]:
    """Runs on the policy thread; returns (replies, perf_counter at the start, seconds inside the policy)."""
    started_at = time.perf_counter()
    outputs = policy.run(items)
    infer_s = time.perf_counter() - started_at
    if not isinstance(outputs, Sequence) or len(outputs) != len(items):
        got = f"{len(outputs)} replies" if isinstance(outputs, Sequence) else type(outputs).__name__
        raise ValueError(f"the batch policy's run() returned {got} for {len(items)} requests")
    return list(outputs), started_at, infer_s


def _settle(future: asyncio.Future, result: Any = None, error: BaseException | None = None) -> None:
    """Resolve a request's future unless its client is gone (then the future was cancelled)."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class Batcher:
    """Gathers prepared requests into batches and runs them on the policy thread, one batch at a time.

    A batch closes when it holds `max_batch` requests or `max_wait_s` after its first request
    arrived, whichever comes first. With max_wait_s 0 a batch takes whatever is waiting when the
    policy thread is free: no request waits for company, and under load batches still form.
    """

    def __init__(self, policy: BatchPolicy, policy_thread: concurrent.futures.Executor, *, max_batch: int,
                 max_wait_s: float, metrics: ServerMetrics):
        self.policy, self.policy_thread, self.metrics = policy, policy_thread, metrics
        self.max_batch, self.max_wait_s = max_batch, max_wait_s
        self._waiting: collections.deque[_WaitingRequest] = collections.deque()
        self._arrived = asyncio.Event()

    async def submit(self, item: Any, received_at: float) -> BatchedReply:
        """Queue one prepared request; returns its reply once its batch has run (or raises the batch's error)."""
        reply: asyncio.Future[BatchedReply] = asyncio.get_running_loop().create_future()
        self._waiting.append(_WaitingRequest(item, received_at, reply))
        self.metrics.queued_requests.set(len(self._waiting))
        self._arrived.set()
        return await reply

    async def run_forever(self) -> None:
        while True:
            batch = await self._next_batch()
            await self._run(batch)

    async def _next_batch(self) -> list[_WaitingRequest]:
        """Wait until a batch closes, then take it off the queue, oldest requests first."""
        while True:
            # A request whose connection handler was cancelled (server shutting down) needs no answer.
            self._waiting = collections.deque(w for w in self._waiting if not w.reply.done())
            self.metrics.queued_requests.set(len(self._waiting))
            timeout = None  # nothing waiting: sleep until something arrives
            if self._waiting:
                timeout = self._waiting[0].received_at + self.max_wait_s - time.perf_counter()
                if len(self._waiting) >= self.max_batch or timeout <= 0:
                    break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), timeout)
            except asyncio.TimeoutError:
                pass
        batch = [self._waiting.popleft() for _ in range(min(self.max_batch, len(self._waiting)))]
        self.metrics.queued_requests.set(len(self._waiting))
        return batch

    async def _run(self, batch: list[_WaitingRequest]) -> None:
        loop = asyncio.get_running_loop()
        try:
            outputs, started_at, infer_s = await loop.run_in_executor(
                self.policy_thread, _run_batch_timed, self.policy, [w.item for w in batch]
            )
        except Exception as e:  # the whole batch failed: each of its requests gets the error
            failure = _policy_failure(e)
            for waiting in batch:
                _settle(waiting.reply, error=failure)
            return
        self.metrics.batch_size.observe(len(batch))
        self.metrics.inference_seconds.observe(infer_s)
        for waiting, output in zip(batch, outputs):
            queue_s = started_at - waiting.received_at
            self.metrics.queue_seconds.observe(queue_s)
            try:
                _check_reply(output)  # one malformed reply fails its own request only
            except (TypeError, ValueError) as e:
                _settle(waiting.reply, error=_policy_failure(e))
                continue
            _settle(waiting.reply, BatchedReply(output, queue_s * 1000, infer_s * 1000, len(batch)))


# ---------------------------------------------------------------------------------------------
# Connections
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Server:
    """What every connection handler shares."""

    policy: BatchPolicy
    batcher: Batcher
    prepare_thread: concurrent.futures.Executor
    metadata_frame: bytes
    request_spec: RequestSpec
    api_key: str | None
    metrics: ServerMetrics


def _has_api_key(request: Request, api_key: str) -> bool:
    """Whether the handshake or HTTP request carries `Authorization: Api-Key <api_key>`."""
    sent = request.headers.get_all("Authorization")
    expected = f"{API_KEY_SCHEME} {api_key}".encode()
    # compare_digest takes as long for a near miss as for a far one: the key cannot be guessed by timing.
    return len(sent) == 1 and hmac.compare_digest(sent[0].encode(), expected)


async def _send_error(connection: ServerConnection, message: str, details: str = "") -> None:
    """openpi's error convention: a text frame, then close 1011. The first line says what went wrong."""
    text = message if not details else f"{message}\n{details}"
    reason = message.encode()[:_MAX_CLOSE_REASON_BYTES].decode(errors="ignore")
    try:
        await connection.send(text)
        await connection.close(CloseCode.INTERNAL_ERROR, reason)
    except websockets.ConnectionClosed:
        pass


async def _answer(server: _Server, frame: str | bytes, received_at: float, prev_total_ms: float | None) -> bytes:
    """One request frame -> its reply frame, or _RequestFailed."""
    loop = asyncio.get_running_loop()
    try:
        request = decode_request(frame, server.request_spec)
        item = await loop.run_in_executor(server.prepare_thread, server.policy.prepare, request)
    except InputError as e:  # includes BadRequest: the client's to fix, no traceback
        raise _RequestFailed(f"bad request: {e}", "", "bad_request") from e
    except Exception as e:
        raise _policy_failure(e) from e
    prepare_ms = (time.perf_counter() - received_at) * 1000
    batched = await server.batcher.submit(item, received_at)  # _RequestFailed when the policy failed
    server_timing = {"infer_ms": batched.infer_ms, "queue_ms": batched.queue_ms,
                     "batch_size": batched.batch_size, "prepare_ms": prepare_ms}
    if prev_total_ms is not None:
        # Receive to end of send, known only once the reply is out: reported one request late.
        server_timing["prev_total_ms"] = prev_total_ms
    try:
        return pack({**batched.output, "server_timing": server_timing})
    except Exception as e:  # a reply msgpack cannot carry (an object, a complex array...)
        raise _policy_failure(e) from e


async def _answer_requests(connection: ServerConnection, server: _Server) -> None:
    client = connection.remote_address
    prev_total_ms: float | None = None
    await connection.send(server.metadata_frame)
    while True:
        frame = await connection.recv()
        received_at = time.perf_counter()
        try:
            reply_frame = await _answer(server, frame, received_at, prev_total_ms)
        except _RequestFailed as failed:
            if failed.outcome == "bad_request":
                logger.warning("client %s: %s", client, failed.message)
            else:
                logger.error("client %s: %s\n%s", client, failed.message, failed.details)
            server.metrics.requests.labels(failed.outcome).inc()
            await _send_error(connection, failed.message, failed.details)
            return
        try:
            await connection.send(reply_frame)
        except websockets.ConnectionClosed:
            server.metrics.requests.labels("disconnected").inc()
            raise
        total_s = time.perf_counter() - received_at
        server.metrics.request_seconds.observe(total_s)
        server.metrics.requests.labels("ok").inc()
        prev_total_ms = total_s * 1000


async def _serve_connection(connection: ServerConnection, server: _Server) -> None:
    client = connection.remote_address
    if server.api_key is not None and not _has_api_key(connection.request, server.api_key):
        logger.warning("client %s: refused: missing or wrong API key", client)
        server.metrics.refused_connections.inc()
        await connection.close(CloseCode.POLICY_VIOLATION, _WRONG_API_KEY_REASON)
        return
    logger.info("client %s connected", client)
    server.metrics.connections.inc()
    try:
        await _answer_requests(connection, server)
    except websockets.ConnectionClosed as e:
        # Also how an oversized frame ends: websockets has already closed with 1009.
        logger.info("client %s disconnected: %s", client, e)
    finally:
        server.metrics.connections.dec()


def _answer_http(connection: ServerConnection, request: Request, *, metrics: ServerMetrics,
                 api_key: str | None) -> Response | None:
    """GET /healthz and /metrics; None lets every other path go on to the websocket handshake."""
    path = request.path.split("?")[0]
    if path == "/healthz":  # open to all: load balancers and orchestrators probe it without keys
        return connection.respond(http.HTTPStatus.OK, "OK\n")
    if path == "/metrics":
        if api_key is not None and not _has_api_key(request, api_key):
            message = f"missing or wrong API key: send the header 'Authorization: {API_KEY_SCHEME} KEY'\n"
            return connection.respond(http.HTTPStatus.UNAUTHORIZED, message)
        body, content_type = metrics.exposition(", ".join(request.headers.get_all("Accept")))
        response = connection.respond(http.HTTPStatus.OK, body.decode())
        del response.headers["Content-Type"]  # respond() says text/plain; Prometheus wants its version too
        response.headers["Content-Type"] = content_type
        return response
    return None


# ---------------------------------------------------------------------------------------------
# Listening
# ---------------------------------------------------------------------------------------------


def _listen_error(host: str, port: int, error: OSError) -> ServeError:
    """A bind failure as one line that names the problem and the fix."""
    if error.errno == errno.EADDRINUSE:
        return ServeError(f"port {port} on {host} is already in use (another pi-run serve?): "
                          "stop that process, or pick a free port with --port")
    if error.errno == errno.EACCES:
        return ServeError(f"no permission to listen on port {port} (ports below 1024 need root): "
                          "pick another with --port")
    if error.errno == errno.EADDRNOTAVAIL:
        return ServeError(f"{host} is not an address of this machine: use 127.0.0.1 (this machine only) "
                          "or 0.0.0.0 (all interfaces) with --host")
    return ServeError(f"cannot listen on {host}:{port}: {error.strerror or error}; check --host and --port")


def check_can_listen(host: str, port: int) -> None:
    """Raise ServeError now if the server could not listen on host:port (port in use, unknown address).

    For the command line: it finds out in a millisecond what serve() would find out only after the
    engines are loaded, which can take minutes. serve() still reports the same errors itself.
    """
    try:
        for family, kind, proto, _, address in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                                   flags=socket.AI_PASSIVE):
            with socket.socket(family, kind, proto) as probe:
                # As asyncio's server does: a port left in TIME_WAIT by a stopped server is free.
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(address)
    except OSError as e:
        raise _listen_error(host, port, e) from None


def is_loopback(host: str) -> bool:
    """Whether `host` is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to an outside address
        return False


def exposure_warning(host: str, port: int, api_key: str | None) -> str | None:
    """The warning for a server that anyone on the network can use; None when it is not one."""
    if api_key is not None or is_loopback(host):
        return None
    return (f"serving on {host}:{port} without an API key: anyone who can reach this machine can use the policy; "
            "set one with --api-key or PI_BUILD_API_KEY (openpi-client: api_key=KEY)")


def _effective_max_batch(policy: BatchPolicy, max_batch: int) -> int:
    if policy.max_batch < max_batch:
        logger.warning("max_batch %d asked, but the policy takes at most %d requests per call: batches hold at most %d"
                       " (build engines for a larger batch size to batch more)", max_batch, policy.max_batch,
                       policy.max_batch)
    return min(max_batch, policy.max_batch)


def _check_options(max_batch: int, max_wait_ms: float, api_key: str | None) -> None:
    if not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")
    if not max_wait_ms >= 0:  # also refuses NaN
        raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms!r}")
    if api_key is not None and not api_key.strip():
        raise ValueError("api_key is empty: give a key, or None for no authentication")


async def serve_async(
    policy: BatchPolicy | Policy,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    metadata: dict,
    max_batch: int = 1,
    max_wait_ms: float = 0.0,
    api_key: str | None = None,
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    request_spec: RequestSpec = LIBERO_REQUEST_SPEC,
    ready: threading.Event | None = None,
    stop: threading.Event | None = None,
) -> None:
    """The server as a coroutine; returns once `stop` is set (never, without one)."""
    _check_options(max_batch, max_wait_ms, api_key)
    batch_policy = as_batch_policy(policy)
    max_batch = _effective_max_batch(batch_policy, max_batch)
    metadata_frame = pack(metadata)  # fail here, not on the first client, if metadata cannot be sent
    metrics = ServerMetrics(max_batch)
    with (
        concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="policy") as policy_thread,
        concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare") as prepare_thread,
    ):
        batcher = Batcher(batch_policy, policy_thread, max_batch=max_batch, max_wait_s=max_wait_ms / 1000,
                          metrics=metrics)
        server = _Server(batch_policy, batcher, prepare_thread, metadata_frame, request_spec, api_key, metrics)
        # The batcher outlives the websocket server: while the server closes, connections still
        # waiting for a batch get their replies (or errors) before their handlers end.
        batcher_task = asyncio.create_task(batcher.run_forever(), name="batcher")
        try:
            await _listen_until_stopped(server, host, port, max_frame_bytes, ready, stop)
        finally:
            batcher_task.cancel()
            try:
                await batcher_task
            except asyncio.CancelledError:
                pass
        logger.info("server stopped")


async def _listen_until_stopped(server: _Server, host: str, port: int, max_frame_bytes: int,
                                ready: threading.Event | None, stop: threading.Event | None) -> None:
    try:
        websocket_server = await websockets_serve(
            functools.partial(_serve_connection, server=server),
            host,
            port,
            compression=None,
            max_size=max_frame_bytes,
            process_request=functools.partial(_answer_http, metrics=server.metrics, api_key=server.api_key),
        )
    except OSError as e:  # the port is taken, the address is not this machine's...
        raise _listen_error(host, port, e) from None
    try:
        logger.info("serving on ws://%s:%d, batches of up to %d, waiting up to %g ms (GET /healthz, /metrics)",
                    host, port, server.batcher.max_batch, server.batcher.max_wait_s * 1000)
        warning = exposure_warning(host, port, server.api_key)
        if warning:
            logger.warning(warning)
        if ready is not None:
            ready.set()
        while stop is None or not stop.is_set():
            await asyncio.sleep(_STOP_POLL_S)
    finally:
        websocket_server.close()  # closes every connection with 1001 (going away)
        await websocket_server.wait_closed()


def serve(policy: BatchPolicy | Policy, **options: Any) -> None:
    """Serve `policy` over openpi's websocket protocol until `stop` is set or SIGINT arrives.

    `policy` is a `batching.BatchPolicy` (prepare() per request, run() per batch) or a plain
    `policy(observation) -> {"actions": np.ndarray, ...}`, which runs one request at a time.
    Requests of concurrent clients are batched: up to `max_batch` (and the policy's own
    max_batch) per call, waiting at most `max_wait_ms` after a batch's first request. Requests are
    checked against `request_spec` before the policy sees them. Each reply adds `server_timing` =
    {"queue_ms", "infer_ms", "batch_size", "prepare_ms" (the part of queue_ms spent on validation
    and prepare()), "prev_total_ms" from the second request of a connection on}. With `api_key`,
    clients must send it (`Authorization: Api-Key <key>`). `ready` is set once the port is
    listening; ServeError when it cannot listen. Run it in a thread and set `stop` to end it.
    """
    try:
        asyncio.run(serve_async(policy, **options))
    except KeyboardInterrupt:  # asyncio.run has already closed the server and its connections
        logger.info("server stopped by SIGINT")


# The blocking server takes exactly the coroutine's options: show them (help(), editors) as its own.
serve.__signature__ = inspect.signature(serve_async)
