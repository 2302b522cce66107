"""Starting or joining the Ray cluster the episodes run on.

By default the command starts a private local cluster sized to the workers asked for and shuts it
down at the end. `--address` joins a running cluster instead (`ray start --head` on a machine
whose nodes have pi-build and LIBERO installed). Ray itself waits minutes for an address where no
cluster answers; a plain TCP connect first turns that into an error within seconds.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Iterator

from pi_build.errors import InputError

CONNECT_TIMEOUT_S = 5.0
# The local object store only carries episode records and MP4s: a small one leaves memory (and
# /dev/shm) to the simulators; Ray's default takes 30% of the machine's memory.
LOCAL_OBJECT_STORE_BYTES = 256 * 2**20


def _host_and_port(address: str) -> tuple[str, int]:
    """`host:port` or `ray://host:port` -> (host, port); InputError for anything else."""
    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise InputError(
            f"--address {address!r} is not a Ray cluster address; give HOST:PORT of its head node "
            "(e.g. 10.0.0.5:6379), ray://HOST:10001, or `auto` for a cluster started on this machine"
        )
    return host.strip("[]"), int(port)


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Fails within `timeout` seconds when nothing listens at the cluster address."""
    if address == "auto":
        return  # Ray looks for a cluster on this machine and says at once when there is none
    host, port = _host_and_port(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as e:
        raise InputError(
            f"no Ray cluster answers at {address} ({e.strerror or type(e).__name__}); start one there with "
            "`ray start --head`, or leave out --address to run on a local cluster"
        ) from None


@contextlib.contextmanager
def ray_cluster(workers: int, address: str | None = None) -> Iterator[None]:
    """Ray, ready for tasks, for the duration of the block.

    Without `address`: a new local cluster with `workers` CPUs, shut down afterwards. With one:
    that cluster, joined (and left afterwards). When this process has already initialised Ray
    (a notebook, the tests), that cluster is used as it is and left running.
    """
    import ray

    if ray.is_initialized():
        yield
        return
    if address is not None:
        check_reachable(address)
        try:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        except ConnectionError as e:
            raise InputError(
                f"cannot join the Ray cluster at {address}: {str(e).splitlines()[0]}\n"
                "a cluster with token authentication needs RAY_AUTH_MODE=token here, and its token "
                "(RAY_AUTH_TOKEN or ~/.ray/auth_token)"
            ) from None
    else:
        # address="local": a new cluster even when RAY_ADDRESS points elsewhere.
        ray.init(
            address="local",
            num_cpus=workers,
            include_dashboard=False,
            object_store_memory=LOCAL_OBJECT_STORE_BYTES,
            logging_level=logging.WARNING,
            log_to_driver=False,  # simulator warnings would tear the progress bar; Ray keeps them in its log folder
        )
    try:
        yield
    finally:
        ray.shutdown()
