"""The errors a user can cause or fix, in one place.

Each one carries a message that names the problem and the fix. Both command-line tools print
such an error as one or two lines and exit with code 1 (``cli.common.handle_errors``); any other
exception is an internal error and keeps its traceback. ``--debug`` shows the traceback of these
too.
"""

from __future__ import annotations


class PiBuildError(Exception):
    """A problem the user can fix: bad input, a missing file, an engine that does not fit."""


class RecipeError(PiBuildError, ValueError):
    """A recipe that cannot be used; the message names the file (or override) and the field."""


class CheckpointError(PiBuildError, ValueError):
    """A checkpoint folder that cannot be loaded as it is; the message names the file or tensor."""


class ArtifactError(PiBuildError):
    """An artifact that is missing, damaged, or does not fit with the others; the message says which and why."""


class BuildError(PiBuildError, RuntimeError):
    """A stage could not produce a trustworthy artifact (inputs missing, an accuracy gate failed...)."""


class GateError(BuildError):
    """Outputs outside their accuracy gate against the reference; nothing was written."""


class BackendUnavailable(PiBuildError, RuntimeError):
    """A backend that cannot run here (TensorRT missing, no GPU); the message says what to install."""


class OnnxExportError(PiBuildError, RuntimeError):
    """torch.onnx could not export the module (the message says which module and why)."""


class OnnxMismatchError(PiBuildError, AssertionError):
    """The ONNX graph, run in onnxruntime, does not match the PyTorch module within the gate."""


class InputError(PiBuildError, ValueError):
    """An observation, prompt or option value the runtime cannot take (too long a prompt, an unknown task...)."""


class ServeError(PiBuildError, OSError):
    """The policy server cannot listen where it was asked (port in use, address not on this machine...)."""
