"""Small I/O helpers shared by every command: atomic writes, hashing, provenance, user errors."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import smat


class SmatError(Exception):
    """An error caused by the user's input. The CLI prints its message (no traceback) and exits 2."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds.

    Readers never see a half-written file, and a crash leaves the previous version (or nothing) in place.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates owner-only files (and some writers recreate the file with their own mode): give
        # results the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs: Any) -> Iterator[Any]:
    """`open()` for writing, with the atomic rename of `atomic_path`."""
    with atomic_path(path) as tmp:
        with open(tmp, mode, **kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder next to `path`; rename it onto `path` only if the block succeeds.

    `path` must not exist or be an empty folder. A crash leaves nothing behind, and the result gets the
    permissions a plain mkdir() would (mkdtemp makes folders private).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        os.rename(tmp, path)  # atomic; replaces `path` only if it is an empty folder
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike) -> Iterator[None]:
    """An exclusive lock on `folder` (flock) while files that belong together are written into it, so that two
    commands writing the same outputs cannot interleave them. Advisory: every writer of the pair takes it."""
    import fcntl

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)          # closing releases the lock


def check_writable(path: str | os.PathLike) -> None:
    """SmatError unless `path` (a file or folder to be written, which need not exist yet) can be created:
    checked before a command starts its work, so that hours of it are not lost to a read-only --out."""
    path = Path(path)
    parent = path if path.is_dir() else path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise SmatError(f"{path}: {parent} is not a folder; choose another output path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SmatError(f"{path}: cannot write in {parent} (permission denied or read-only); choose another "
                        "output path")


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    with atomic_open(path, "w", encoding="utf-8") as handle:
        json.dump(obj, handle, indent=indent, sort_keys=False, default=_json_default)
        handle.write("\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise SmatError(f"{path}: file not found") from None
    except json.JSONDecodeError as err:
        raise SmatError(f"{path}: not valid JSON ({err})") from None


def load_torch(path: str | os.PathLike, what: str, fix: str, *, weights_only: bool = True, mmap: bool = False,
               allowed: tuple = (), name: str | None = None) -> Any:
    """`torch.load` to the CPU with one error message for a missing or unreadable file.

    `what` names the file's kind ("backbone checkpoint"), `fix` says what to do instead; `allowed` lists the
    classes beyond tensors that `weights_only` loading may unpickle; `name` is what messages call the file
    (e.g. the URL it was downloaded from), by default its path.
    """
    import torch

    path = Path(path)
    name = name or str(path)
    if not path.is_file():
        raise SmatError(f"{name}: {what} not found; {fix}")
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=mmap)
    except Exception as err:  # torch raises many exception types for files it cannot read
        raise SmatError(f"{name}: not a readable {what} ({brief_error(err)}); {fix}") from None


def load_torch_record(path: str | os.PathLike, what: str, fmt: str, fix: str, **kwargs: Any) -> dict[str, Any]:
    """A dict saved by `torch.save` whose "format" key is `fmt`; anything else is one clear error."""
    record = load_torch(path, what, fix, **kwargs)
    if not isinstance(record, dict) or record.get("format") != fmt:
        raise SmatError(f"{path}: not a {what} (format {fmt!r}); {fix}")
    return record


def first_nonfinite(tensors: dict[str, Any]) -> str | None:
    """Name of the first floating-point tensor of `tensors` holding NaN or infinity, else None."""
    import torch

    for name, tensor in tensors.items():
        if torch.is_tensor(tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            return name
    return None


def brief_error(err: Exception) -> str:
    """First line of an exception from torch / safetensors, whose messages can run to many lines."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def stable_hash(obj: Any, length: int = 12) -> str:
    """Hash of a JSON-serialisable object that is identical across processes and machines."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_json_default)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


def git_commit() -> str | None:
    """Commit of the source tree the package is imported from, or None outside a git checkout."""
    root = Path(smat.__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def provenance(**extra: Any) -> dict[str, Any]:
    """What produced a result: package version and commit, library versions, host, time, plus `extra`."""
    import numpy
    import torch

    record = {
        "smat_version": smat.__version__,
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "host": socket.gethostname(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    record.update(extra)
    return record
