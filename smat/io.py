"""Small I/O helpers shared by every command: atomic writes, hashing, provenance, user errors."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import smat

log = logging.getLogger(__name__)


class SmatError(Exception):
    """An error caused by the user's input. The CLI prints its message (no traceback) and exits 2."""


# Errors of a write that ran out of space: the OS's, a file-size limit, and the messages of writers that do
# not pass the OSError on (torch.save's zip writer: "enforce fail at inline_container"; safetensors: Rust's).
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_NO_SPACE_TEXT = ("inline_container", "No space left", "StorageFull", "File too large", "FileTooLarge",
                  "Disk quota exceeded")


def is_disk_full(err: BaseException) -> bool:
    if isinstance(err, OSError):
        return err.errno in _NO_SPACE
    return isinstance(err, RuntimeError) and any(text in str(err) for text in _NO_SPACE_TEXT)


def disk_full_error(path: str | os.PathLike, err: BaseException) -> SmatError:
    """The one message for any writer that ran out of space."""
    detail = err.strerror if isinstance(err, OSError) and err.strerror else brief_error(err)
    return SmatError(f"{path}: not written: no space left (the disk is full, or a quota or file-size limit was "
                     f"reached: {detail}); free space or write elsewhere")


# Temporary files and folders are named `.NAME.XXXXXXXX.tmp` (NAME: what they become) and locked (flock) by
# their writer while it runs: the lock dies with the process, so the next writer of NAME removes what a killed
# one left behind (`_remove_stale`) without touching a live writer's file. The lock is released with its fd.
def _temp_pattern(name: str | None) -> re.Pattern:
    """Temporary files of NAME; of any name with None."""
    return re.compile((re.escape(f".{name}.") if name else r"\..+\.") + r"[a-z0-9_]{8}\.tmp")


def _claim_temp(parent: Path, name: str, folder: bool) -> tuple[Path, int]:
    """A new temporary file or folder for NAME in `parent` and the fd that holds its lock."""
    _remove_stale(parent, name)
    while True:
        if folder:
            tmp = tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=parent)
            fd = os.open(tmp, os.O_RDONLY)
        else:
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=parent)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(fd).st_nlink:       # not removed by another writer's cleaning before we locked it
                return Path(tmp), fd
        except BlockingIOError:             # another writer is removing it: take a new name
            pass
        os.close(fd)


def _remove_stale(parent: Path, name: str | None) -> None:
    """Remove the temporary files and folders of NAME (None: of any name) whose writers are dead (their lock is
    free)."""
    pattern = _temp_pattern(name)
    with os.scandir(parent) as entries:
        stale = [entry for entry in entries if pattern.fullmatch(entry.name) and not entry.is_symlink()]
    for entry in stale:
        try:
            fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                os.unlink(entry.path)
            log.info("removed %s, left by an interrupted writer", entry.path)
        except OSError:                     # locked by a live writer, or already gone
            pass
        finally:
            os.close(fd)


def _plain_permissions(path: Path, mode: int) -> None:
    """mkstemp / mkdtemp make private files: give results the permissions a plain open() / mkdir() would."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds.

    Readers never see a half-written file, and a crash leaves the previous version (or nothing) in place; a
    full disk is one SmatError naming `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path, fd = _claim_temp(path.parent, path.name, folder=False)
    try:
        yield tmp_path
        _plain_permissions(tmp_path, 0o666)
        os.replace(tmp_path, path)
    except BaseException as err:
        if is_disk_full(err):
            raise disk_full_error(path, err) from None
        raise
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
        os.close(fd)


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

    `path` must not exist or be an empty folder. A crash leaves nothing behind (a killed process: nothing
    that the next writer of `path` keeps), and a full disk is one SmatError naming `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, fd = _claim_temp(path.parent, path.name, folder=True)
    try:
        yield tmp
        _plain_permissions(tmp, 0o777)
        os.rename(tmp, path)  # atomic; replaces `path` only if it is an empty folder
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(err):
            raise disk_full_error(path, err) from None
        raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def scratch_dir(near: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder next to the output `near` (cluster /tmp is often small), removed afterwards; one left
    by a killed process is removed by the next one."""
    near = Path(near)
    near.parent.mkdir(parents=True, exist_ok=True)
    tmp, fd = _claim_temp(near.parent, f"{near.name}.scratch", folder=True)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        os.close(fd)


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike) -> Iterator[None]:
    """An exclusive lock on `folder` (flock) while files that belong together are written into it, so that two
    commands writing the same outputs cannot interleave them. Advisory: every writer of the pair takes it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)          # closing releases the lock


@contextlib.contextmanager
def run_lock(folder: str | os.PathLike, command: str) -> Iterator[None]:
    """Hold `folder` (the --out of a long-running `command`) for this process alone: a second run into the
    same folder is refused at once instead of interleaving its files with the first one's."""
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SmatError(f"{folder}: another `{command}` is running into this folder; wait for it to end, "
                            "or choose another --out") from None
        _remove_stale(folder, None)     # what a killed run left, also files this run will not write again
        yield
    except BaseException:
        if created:                 # a run that failed before writing anything leaves no empty folder behind
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    finally:
        os.close(fd)


def check_outputs(outputs: Sequence[tuple[Path, str]], inputs: Sequence[Path]) -> None:
    """SmatError, before any work, when an output would replace or write into an input, or exists as something
    else than it will be written as (a device, a FIFO, a folder for a file).

    `outputs`: (path, "file" | "folder") for everything the command writes, derived names included; a folder
    output is written as a whole, so no input may lie inside it. `inputs`: files and folders it reads; no output
    may be one of them (by path, symbolic link or hard link) or lie inside an input folder.
    """
    for i, (out, kind) in enumerate(outputs):
        if out.exists():
            mode = out.stat().st_mode
            wanted = stat.S_ISDIR(mode) if kind == "folder" else stat.S_ISREG(mode)
            if not wanted:
                raise SmatError(f"{out}: exists and is {_file_kind(mode)}, not a {kind}; choose another output "
                                "path")
        for other, _ in outputs[i + 1:]:
            if _same(out, other):
                raise SmatError(f"{out}: two outputs of the command would be this one file (an output, and a "
                                "name derived from another such as EVAL.json or OUT.partial); choose other paths")
        for source in inputs:
            if _same(out, source):
                raise SmatError(f"{out}: is also an input of this command ({source}); an output never replaces "
                                "an input: choose another output path")
            if source.is_dir() and _inside(out, source):
                raise SmatError(f"{out}: lies inside the input folder {source}; choose an output path outside it")
            if kind == "folder" and _inside(source, out):
                raise SmatError(f"{source}: an input inside the output folder {out}, which the command writes; "
                                "move it elsewhere or choose another output folder")


def _same(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)          # hard links
    except OSError:                            # one of them does not exist
        return False


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def _file_kind(mode: int) -> str:
    kinds = [(stat.S_ISDIR, "a folder"), (stat.S_ISREG, "a regular file"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket")]
    return next((text for test, text in kinds if test(mode)), "a special file")


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
    return _parse_json(Path(path), _read_json_bytes(Path(path)))


def read_json_sha256(path: str | os.PathLike) -> tuple[Any, str]:
    """The parsed JSON file and the sha256 of the very bytes that were parsed (read once, so a file replaced
    meanwhile cannot give one version's content with another's hash)."""
    data = _read_json_bytes(Path(path))
    return _parse_json(Path(path), data), hashlib.sha256(data).hexdigest()


def _read_json_bytes(path: Path) -> bytes:
    if path.exists() and not path.is_file():       # a FIFO would block the read, a folder fail obscurely
        raise SmatError(f"{path}: not a regular file")
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise SmatError(f"{path}: file not found") from None


def _parse_json(path: Path, data: bytes) -> Any:
    try:
        return json.loads(data.decode("utf-8"))
    except json.JSONDecodeError as err:
        raise SmatError(f"{path}: not valid JSON ({err})") from None


def load_torch(path: str | os.PathLike, what: str, fix: str, *, mmap: bool = False, allowed: tuple = (),
               name: str | None = None) -> Any:
    """`torch.load` to the CPU with one error message for a missing or unreadable file.

    Always torch's restricted unpickler (`weights_only`): tensors and plain types, plus the classes of
    `allowed`; anything else in the file (code to run) is refused. `what` names the file's kind ("backbone
    checkpoint"), `fix` says what to do instead; `name` is what messages call the file (e.g. the URL it was
    downloaded from), by default its path.
    """
    import torch

    path = Path(path)
    name = name or str(path)
    if not path.is_file():
        raise SmatError(f"{name}: {what} not found; {fix}")
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # torch raises many exception types for files it cannot read
        if refused := re.search(r"GLOBAL (\S+)", str(err)):
            raise SmatError(f"{name}: refused: the file holds a Python object ({refused.group(1)}) beyond tensors "
                            f"and plain values, and loading it could run code; {fix}") from None
        if "Weights only load failed" in str(err):      # torch's advice, to load it unrestricted, is not ours
            raise SmatError(f"{name}: not a readable {what} (not a torch file, or damaged); {fix}") from None
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


def check_unchanged(path: str | os.PathLike, sha256: str, what: str) -> None:
    """SmatError unless the file at `path` still has the `sha256` taken before it was read: re-checked after
    reading, so that what was read is what the result records."""
    if (now := sha256_file(path)) != sha256:
        raise SmatError(f"{path}: the {what} changed while it was being read (sha256 {sha256[:12]} before, "
                        f"{now[:12]} after); re-run once nothing writes it")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    if Path(path).exists() and not Path(path).is_file():      # a FIFO would block, a device never end
        raise SmatError(f"{path}: not a regular file")
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
