"""The only writers of files. Whatever pi-build writes appears whole or not at all.

Every writer here builds the file (or folder) under a hidden temporary name beside its final
place, flushes it to disk and renames it into place in one step (rename(2) is atomic within a
file system). A crash or an exception leaves either the old content or the new, never half of
it; the temporary names start with "." so that listings of artifacts never see them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CHUNK = 1 << 23  # 8 MiB: weights are gigabytes, read them in pieces


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` for a writer that wants a file name (torch.save, imageio,
    safetensors...); renamed to ``path`` when the block ends without an exception, deleted otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The temporary name keeps the suffix: some writers (imageio) pick the format by it.
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # the writer may not have flushed to disk
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` (text is UTF-8) to ``path`` atomically; returns ``path``."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else bytes(data))
    return path


def to_json(data: Any) -> str:
    """The JSON text pi-build writes: indented, NaN refused (it is not JSON), a final newline."""
    return json.dumps(data, indent=2, allow_nan=False) + "\n"


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """``data`` as JSON at ``path``, atomically."""
    return atomic_write(path, to_json(data))


def read_json(path: str | os.PathLike, error: type[Exception] = ValueError) -> dict[str, Any]:
    """A JSON object from ``path``; a missing, unreadable or non-object file raises ``error`` naming it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise error(f"{path} does not exist") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise error(f"{path} cannot be read ({e})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line (a JSON-lines record) and flush it to disk before returning.

    A line is written with one write(2) on a file opened for appending, so concurrent appenders
    never interleave inside a line, and a crash loses at most the line being written (readers
    skip a torn last line).
    """
    if "\n" in line:
        raise ValueError("append_line writes one line; the text holds a newline")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, *, replace: bool = False) -> Iterator[Path]:
    """A hidden temporary folder beside ``final``, filled by the block and renamed to ``final`` at its end.

    ``final`` must not exist unless ``replace``: then the old folder is moved aside and deleted
    only after the new one is in place. On an exception the temporary folder is removed and
    ``final`` is untouched.
    """
    final = Path(final)
    if final.exists() and not replace:
        raise FileExistsError(f"{final} exists")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.partial-"))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; what it becomes is for everyone to read
        yield tmp
        move_dir_into_place(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(final.parent)


@contextlib.contextmanager
def atomic_files(path: str | os.PathLike) -> Iterator[Path]:
    """A hidden staging folder for a writer that puts ``path`` and companion files beside it (an
    ONNX model and its external weights). When the block ends, each file written there moves into
    ``path``'s folder, ``path`` itself last: once it exists, its companions are in place. On an
    exception nothing moves and the staging folder is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.staging-"))
    try:
        yield staging
        main = staging / path.name
        for file in sorted(staging.iterdir(), key=lambda f: f == main):
            os.replace(file, path.parent / file.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    fsync_dir(path.parent)


def move_dir_into_place(tmp: Path, final: Path) -> None:
    """rename(2) a finished folder to ``final``; an old ``final`` is moved aside first and deleted after."""
    if not final.exists():
        os.rename(tmp, final)
        return
    old = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.old-"))
    os.rename(final, old / "previous")
    try:
        os.rename(tmp, final)
    except BaseException:
        os.rename(old / "previous", final)
        raise
    shutil.rmtree(old, ignore_errors=True)


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 hex digest of a file, read in 8 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def copy_and_hash(source: str | os.PathLike, dest: str | os.PathLike) -> dict[str, Any]:
    """Copy one file into a folder being assembled (by ``atomic_dir``), hashing the bytes as they
    pass and flushing them to disk; returns {"sha256": hex, "bytes": size}."""
    digest, size = hashlib.sha256(), 0
    with open(source, "rb") as src, open(dest, "wb") as dst:
        while chunk := src.read(CHUNK):
            digest.update(chunk)
            dst.write(chunk)
            size += len(chunk)
        dst.flush()
        os.fsync(dst.fileno())
    return {"sha256": digest.hexdigest(), "bytes": size}


def sha256_json(data: Any) -> str:
    """sha256 of ``data``'s canonical JSON (sorted keys, no spaces): equal content, equal hash."""
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()
