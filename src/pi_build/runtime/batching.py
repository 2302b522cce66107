"""Batched policies: the contract between the policy server and a runtime that runs many requests at once.

The server (``serve.py``) gathers the requests of concurrent clients and hands them to a
``BatchPolicy`` in two steps:

    prepare(request) -> item          once per request, as soon as it arrives: validation and
                                      preprocessing. It may raise ``InputError``: that request
                                      alone is refused, its future batch-mates never see it.
    run(items) -> [reply, ...]        one batched inference over up to ``max_batch`` prepared
                                      items; reply i answers items[i].

``prepare`` runs on a thread of its own, concurrently with ``run`` (which always runs on the
one policy thread), so it must not touch state that ``run`` changes: keep it to pure
preprocessing on the CPU. A plain one-at-a-time policy, ``policy(request) -> reply``, is
adapted by ``as_batch_policy`` (``max_batch`` 1).

Also here, for runtimes that batch:
- noise for reproducible sampling: a request may carry an integer ``noise_seed``; its noise is
  then a function of that seed alone (``draw_noise``), so its actions do not depend on which
  requests it was batched with;
- ``run_padded``: engines are built for fixed batch sizes; n requests run on the smallest size
  that holds them, the spare rows padded with copies of a real row and cut from the output.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from pi_build.errors import InputError

# The optional request key holding the noise seed (an integer in [0, 2**64)).
NOISE_SEED_KEY = "noise_seed"
_SEED_LIMIT = 2**64  # torch.Generator.manual_seed takes any unsigned 64-bit value


@runtime_checkable
class BatchPolicy(Protocol):
    """What the server calls; see the module docstring for the threads each method runs on."""

    max_batch: int  # the most items one run() takes

    def prepare(self, request: dict) -> Any:
        """Validate and preprocess one request; raise InputError for a request the client must fix."""
        ...

    def run(self, items: Sequence[Any]) -> list[dict]:
        """One batched inference: one reply dict (with "actions") per item, in order."""
        ...


class OneAtATime:
    """A plain ``policy(request) -> reply`` as a BatchPolicy of batch size 1."""

    max_batch = 1

    def __init__(self, policy: Callable[[dict], dict]):
        self.policy = policy

    def prepare(self, request: dict) -> dict:
        return request  # the plain policy validates inside its own call

    def run(self, items: Sequence[dict]) -> list[dict]:
        return [self.policy(item) for item in items]


def as_batch_policy(policy: BatchPolicy | Callable[[dict], dict]) -> BatchPolicy:
    """``policy`` itself when it batches, else wrapped in ``OneAtATime``."""
    if isinstance(policy, BatchPolicy):
        if not isinstance(policy.max_batch, int) or policy.max_batch < 1:
            raise ValueError(f"a batch policy's max_batch must be an integer >= 1, got {policy.max_batch!r}")
        return policy
    if not callable(policy):
        raise TypeError(f"a policy must be callable or have prepare() and run(), got {type(policy).__name__}")
    return OneAtATime(policy)


# ----------------------------------------------------------------------------- noise


def noise_seed(request: Mapping) -> int | None:
    """The request's ``noise_seed``, or None when it has none; InputError when it is not a valid seed."""
    value = request.get(NOISE_SEED_KEY)
    if value is None:
        return None
    # bool is an int in Python; a seed of True is a client bug, not a seed.
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise InputError(f"'{NOISE_SEED_KEY}' must be an integer in [0, 2**64), got {type(value).__name__}")
    if not 0 <= int(value) < _SEED_LIMIT:
        raise InputError(f"'{NOISE_SEED_KEY}' must be in [0, 2**64), got {int(value)}")
    return int(value)


def draw_noise(shape: Sequence[int], seed: int | None, generator: torch.Generator) -> Tensor:
    """Standard normal float32 noise on the CPU: from its own generator seeded with ``seed``, or,
    without a seed, the next draw of ``generator`` (the policy's, so unseeded runs still differ).

    Drawn per request, never per batch: a seeded request gets the same noise whatever its batch.
    """
    if seed is not None:
        generator = torch.Generator().manual_seed(seed)
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32)


# ----------------------------------------------------------------------------- engine batch sizes


def smallest_batch_size(n_rows: int, sizes: Sequence[int]) -> int:
    """The smallest of ``sizes`` (the batch sizes engines exist for) that holds ``n_rows``."""
    fitting = [size for size in sizes if size >= n_rows]
    if n_rows < 1 or not fitting:
        raise ValueError(f"cannot run {n_rows} rows on engines built for batch sizes {sorted(sizes)}")
    return min(fitting)


def pad_rows(tensor: Tensor, size: int) -> Tensor:
    """``tensor`` [n, ...] grown to [size, ...] with copies of its first row.

    A copy of a real row, rather than zeros, is an input the engines were made for (real tokens
    and masks, finite values), so no padded row can produce NaN or inf; and since no operation of
    the model mixes rows of a batch, the padded rows cannot change the real ones.
    """
    n = tensor.shape[0]
    if size < n:
        raise ValueError(f"cannot pad {n} rows down to {size}")
    if size == n:
        return tensor
    return torch.cat([tensor, tensor[:1].expand(size - n, *tensor.shape[1:])])


def run_padded(
    inputs: Sequence[Tensor], sizes: Sequence[int], run: Callable[[int, tuple[Tensor, ...]], Tensor]
) -> Tensor:
    """Run the n rows of ``inputs`` (tensors [n, ...]) on the smallest engine batch size that holds them.

    ``run(size, padded_inputs)`` runs the engines built for ``size``; its output's first n rows
    (the real ones) are returned, the padding is dropped.
    """
    n_rows = inputs[0].shape[0]
    if any(t.shape[0] != n_rows for t in inputs):
        raise ValueError(f"inputs disagree on the number of rows: {[t.shape[0] for t in inputs]}")
    size = smallest_batch_size(n_rows, sizes)
    output = run(size, tuple(pad_rows(t, size) for t in inputs))
    if output.shape[0] != size:
        raise ValueError(f"the engines of batch size {size} returned {output.shape[0]} rows")
    return output[:n_rows]
