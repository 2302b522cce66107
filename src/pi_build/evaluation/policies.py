"""Where the policy runs during an evaluation: inside each worker, or behind one policy server.

Both are described by a small picklable object that the driver ships to the workers; `connect()`
turns it into a callable `observation -> reply` on the worker (worker.py keeps it):

- `InWorkerPolicy`: each worker process loads its own copy of the policy from a picklable
  factory (e.g. functools.partial(policy_for_recipe, engines, recipe, "cpu")). The CPU case: tiny
  models, CI, no GPU to share.
- `ServerPolicy`: every worker talks to one policy server over websockets with openpi's wire
  protocol (`pi-run serve`, or openpi's own server). The GPU case: one GPU serves all simulators.
  `serve_in_background` starts such a server inside the driver on a free port.

A reply is the policy's dict: "actions" [H, >= 7], plus timings ("policy_timing" from pi-build's
Policy, "server_timing" from a server).
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

from pi_build.errors import InputError

PolicyFn = Callable[[dict[str, Any]], dict[str, Any]]

SERVER_START_TIMEOUT_S = 60.0
# How long the in-process server lets a batch wait for more workers' requests: a few ms against
# simulator steps of tens of ms.
BATCH_WAIT_MS = 2.0
CONNECT_TIMEOUT_S = 10.0


@dataclasses.dataclass(frozen=True)
class InWorkerPolicy:
    """A policy each worker loads for itself; `factory` must pickle (Ray ships it to the workers)."""

    factory: Callable[[], PolicyFn]
    name: str  # says which policy this is; workers keep one loaded policy per name

    @property
    def cache_key(self) -> str:
        return f"in-worker:{self.name}"

    @property
    def where(self) -> str:
        return "worker"

    def connect(self) -> PolicyFn:
        return self.factory()


@dataclasses.dataclass(frozen=True)
class ServerPolicy:
    """A policy server every worker calls: ws://host:port of `pi-run serve` or openpi's server."""

    url: str

    @property
    def cache_key(self) -> str:
        return f"server:{self.url}"

    @property
    def where(self) -> str:
        return "server"

    def connect(self) -> PolicyFn:
        return WebsocketPolicy(self.url)


PolicySource = InWorkerPolicy | ServerPolicy  # what workers receive


@dataclasses.dataclass(frozen=True)
class LocalServer:
    """Start a policy server inside the driver for the run, and have the workers call it.

    `load` loads the policy (in the driver, once: on the GPU, say); `metadata` describes it to
    clients, as `pi-run serve` does.
    """

    load: Callable[[], PolicyFn]
    metadata: Callable[[PolicyFn], dict[str, Any]] = lambda policy: {}

    @property
    def where(self) -> str:
        return "server"


PolicyPlan = InWorkerPolicy | ServerPolicy | LocalServer  # what the driver is told


class PolicyServerError(RuntimeError):
    """The policy server refused a request or failed on it (it sends the reason as a text frame)."""


class WebsocketPolicy:
    """A blocking client of openpi's websocket policy protocol (what openpi-client does).

    On connect the server sends its metadata; then each observation frame gets one reply frame.
    """

    def __init__(self, url: str, open_timeout: float = CONNECT_TIMEOUT_S):
        from websockets.sync.client import connect

        from pi_build.runtime.serve import unpack

        self.url = url
        # No compression and no size limit, as openpi's client: frames are raw image bytes.
        self._connection = connect(url, compression=None, max_size=None, open_timeout=open_timeout)
        self.metadata = unpack(self._connection.recv())

    def __call__(self, observation: dict[str, Any]) -> dict[str, Any]:
        from pi_build.runtime.serve import pack, unpack

        self._connection.send(pack(observation))
        reply = self._connection.recv()
        if isinstance(reply, str):  # openpi's error convention: a text frame, then close
            raise PolicyServerError(f"policy server {self.url}: {reply.splitlines()[0]}")
        return unpack(reply)

    def close(self) -> None:
        self._connection.close()


def server_metadata(url: str) -> dict[str, Any]:
    """Connects once to check that a policy server answers at `url`; returns its metadata."""
    try:
        client = WebsocketPolicy(url)
    except (OSError, TimeoutError, ValueError) as e:  # refused, unreachable, or not a ws:// URL
        raise InputError(
            f"no policy server answers at {url} ({type(e).__name__}: {e}); start one with "
            "`pi-run serve`, or leave out --server-url to start one inside this command"
        ) from None
    except Exception as e:  # websockets' handshake errors: something else listens there
        raise InputError(f"{url} is not an openpi policy server ({type(e).__name__}: {e}); check --server-url") from None
    client.close()
    return client.metadata if isinstance(client.metadata, dict) else {}


def free_port(host: str) -> int:
    """A TCP port nobody listens on now (the OS picks it); the server binds it right after."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def serve_in_background(policy: PolicyFn, metadata: dict[str, Any], *, bind: str, advertise: str) -> Iterator[str]:
    """Runs pi-build's policy server on a thread of this process for the duration of the block.

    Yields the URL the workers should call: `advertise` is the address they reach this machine at
    (127.0.0.1 on a local cluster), `bind` the interface to listen on (0.0.0.0 for remote workers).
    """
    from pi_build.runtime import serve

    port = free_port(bind)
    ready, stop = threading.Event(), threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        try:
            # Batches the workers' concurrent requests, as far as the engines' batch sizes allow.
            serve.serve(policy, host=bind, port=port, metadata=metadata, ready=ready, stop=stop,
                        max_batch=getattr(policy, "max_batch", 1), max_wait_ms=BATCH_WAIT_MS)
        except BaseException as e:  # seen by the waiting thread below, not lost in this one
            failure.append(e)
            ready.set()

    thread = threading.Thread(target=run, name="policy-server", daemon=True)
    thread.start()
    if not ready.wait(SERVER_START_TIMEOUT_S) or failure:
        stop.set()
        reason = f"{type(failure[0]).__name__}: {failure[0]}" if failure else "not listening in time"
        raise RuntimeError(f"the in-process policy server on port {port} did not start ({reason})")
    try:
        yield f"ws://{advertise}:{port}"
    finally:
        stop.set()
        thread.join(timeout=10)


@contextlib.contextmanager
def ready_policy(plan: PolicyPlan, *, local_cluster: bool) -> Iterator[PolicySource]:
    """The policy source the workers get, ready for the duration of the block.

    A server URL is checked once here (a typo fails now, not on every worker); a `LocalServer`
    is started and stopped. On a cluster of other machines the local server listens on every
    interface and is advertised at this machine's address.
    """
    if isinstance(plan, InWorkerPolicy):
        yield plan
    elif isinstance(plan, ServerPolicy):
        server_metadata(plan.url)
        yield plan
    else:
        policy = plan.load()
        if local_cluster:
            bind = advertise = "127.0.0.1"
        else:
            import ray.util

            bind, advertise = "0.0.0.0", ray.util.get_node_ip_address()
        with serve_in_background(policy, plan.metadata(policy), bind=bind, advertise=advertise) as url:
            yield ServerPolicy(url)
