"""Writes that a crash cannot tear: atomic files and folders, a lock per target, manifests checked on load.

* :func:`atomic_write_text` / :func:`atomic_write_json` / :func:`atomic_file`: a temporary sibling, fsync,
  ``os.replace``.
* :func:`atomic_folder`: build a folder in a staging sibling ``.<name>.partial-<pid>``, fsync every file and
  the folder, then swap it into place. An existing complete folder stays until the new one is in place
  (an atomic exchange where the kernel offers one, else: old aside, new in), and only then is removed.
* :func:`target_lock`: ``fcntl.flock`` on ``.<name>.lock`` beside a target: one builder at a time; the
  others wait, then find the target built (every rank of ``accelerate launch``, two notebooks).
* :func:`write_manifest` / :func:`manifest_problem`: ``manifest.json`` (what the folder was built from, each
  file's size and sha256) written last; a folder whose manifest is missing or does not match is not used.
* :func:`safetensors_problem`: a ``.safetensors`` file whose header promises more bytes than the file has.
* :func:`fault_point`: a named pause for the fault-injection tests (``$PHI3_LORA_FAULT_POINT``); a no-op otherwise.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import struct
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FAULT_POINT_ENV_VAR = "PHI3_LORA_FAULT_POINT"  # "<name>" or "<name>@<n>": pause at the n-th time that point is hit
FAULT_READY_ENV_VAR = "PHI3_LORA_FAULT_READY"  # a file the paused process creates, so a test knows when to kill
FAULT_SLEEP_ENV_VAR = "PHI3_LORA_FAULT_SLEEP"  # seconds: pause there and carry on instead of waiting for the kill
_fault_hits: dict[str, int] = {}
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|old)-(?P<pid>\d+)$")


def fault_point(name: str) -> None:
    """Pause here forever when ``$PHI3_LORA_FAULT_POINT`` names this point (tests kill the process meanwhile)."""
    wanted = os.environ.get(FAULT_POINT_ENV_VAR)
    if not wanted:
        return
    point, _, count = wanted.partition("@")
    if point != name:
        return
    _fault_hits[name] = _fault_hits.get(name, 0) + 1
    if _fault_hits[name] != int(count or 1):
        return
    ready = os.environ.get(FAULT_READY_ENV_VAR)
    if ready:
        Path(ready).write_text(f"{name} {os.getpid()}\n", encoding="utf-8")
    if os.environ.get(FAULT_SLEEP_ENV_VAR):  # a slow writer: pause, then carry on
        time.sleep(float(os.environ[FAULT_SLEEP_ENV_VAR]))
        return
    while True:  # the test sends SIGKILL
        time.sleep(60)


# --- files -------------------------------------------------------------------------------------------


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's contents (a folder: its entries, i.e. renames) to the disk."""
    descriptor = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary sibling, fsync and rename: readers see old or new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)
    return path


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path for a writer that needs a file name; it replaces ``path`` when the block ends."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        yield temporary
        fsync_path(temporary)
        os.replace(temporary, path)
        fsync_path(path.parent)
    finally:
        temporary.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, value: Any) -> Path:
    """:func:`atomic_write_bytes` for a JSON value (indented, UTF-8)."""
    return atomic_write_text(path, json.dumps(value, indent=1, default=str) + "\n")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --- manifests ---------------------------------------------------------------------------------------


def folder_files(folder: Path) -> list[Path]:
    """Every file under ``folder`` except the manifest itself, sorted."""
    return sorted(path for path in folder.rglob("*") if path.is_file() and path.name != MANIFEST)


def write_manifest(folder: str | Path, inputs: dict[str, Any] | None = None) -> Path:
    """Write ``manifest.json`` last: ``inputs`` (what the folder was built from) and each file's size and sha256."""
    folder = Path(folder)
    files = {str(path.relative_to(folder)): {"size": path.stat().st_size, "sha256": sha256_file(path)}
             for path in folder_files(folder)}
    return atomic_write_json(folder / MANIFEST, {"inputs": inputs or {}, "files": files})


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    """The folder's manifest, or None when it has none (or an unreadable one)."""
    try:
        manifest = json.loads((Path(folder) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict) else None


def manifest_problem(folder: str | Path, inputs: dict[str, Any] | None = None, *, hashes: bool = False) -> str | None:
    """What is wrong with a built folder (None: nothing): no manifest, other inputs, a missing or changed file.

    Sizes and ``.safetensors`` headers are always checked (fast); ``hashes=True`` also re-hashes every file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return f"{folder} does not exist"
    manifest = read_manifest(folder)
    if manifest is None:
        return f"{folder} has no {MANIFEST} (an interrupted build, or one made before manifests existed)"
    if inputs is not None:
        inputs = json.loads(json.dumps(inputs, default=str))  # as the manifest stores them (tuples -> lists)
        recorded = manifest.get("inputs") or {}
        changed = sorted(key for key in set(recorded) | set(inputs) if recorded.get(key) != inputs.get(key))
        if changed:
            details = "; ".join(f"{key}: built from {recorded.get(key)!r:.80}, now {inputs.get(key)!r:.80}"
                                for key in changed)
            return f"{folder} was built from other inputs ({details})"
    for name, entry in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != entry.get("size"):
            return f"{path} has {path.stat().st_size} bytes, the manifest recorded {entry.get('size')}"
        if hashes and sha256_file(path) != entry.get("sha256"):
            return f"{path} does not match the sha256 in the manifest"
    for path in folder.glob("*.safetensors"):
        problem = safetensors_problem(path)
        if problem:
            return problem
    return None


def safetensors_problem(path: str | Path) -> str | None:
    """Why a ``.safetensors`` file is incomplete (None: its header and size agree): truncated files are refused."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                return f"{path} is truncated ({size} bytes: not even a safetensors header)"
            (header_bytes,) = struct.unpack("<Q", head)
            if header_bytes > size - 8:
                return f"{path} is truncated (its header alone needs {header_bytes} bytes, the file has {size})"
            header = json.loads(handle.read(header_bytes))
    except (OSError, ValueError, UnicodeDecodeError) as error:
        return f"{path} is not a readable safetensors file ({type(error).__name__}: {error})"
    end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    if 8 + header_bytes + end != size:
        return (f"{path} is truncated or padded: its header describes {8 + header_bytes + end} bytes, "
                f"the file has {size}")
    return None


# --- folders -----------------------------------------------------------------------------------------

_RENAME_EXCHANGE = 2


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_cwd = -100
    if renameat2(at_cwd, os.fsencode(first), at_cwd, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    if ctypes.get_errno() in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP if hasattr(errno, "EOPNOTSUPP") else 95):
        return False
    raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), str(first))


def _pid_alive(pid: int) -> bool:
    """True when a process with this id exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_leftovers(target: str | Path) -> list[str]:
    """Remove staging (``.partial-<pid>``) and replaced (``.old-<pid>``) copies of ``target`` whose writer is dead.

    Returns one line per removal, which callers print or log ("what the next run found").
    """
    target = Path(target)
    removed = []
    if not target.parent.is_dir():
        return removed
    for path in target.parent.iterdir():
        match = _LEFTOVER.match(path.name)
        if not match or match["name"] != target.name or _pid_alive(int(match["pid"])):
            continue
        what = ("an interrupted write" if match["kind"] == "partial"
                else "the previous copy, replaced by a run that stopped before removing it")
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        removed.append(f"removed {path.name}: {what} (process {match['pid']}, no longer running)")
    for line in removed:
        logger.warning("%s: %s", target, line)
    return removed


def commit_folder(staging: Path, target: Path) -> None:
    """fsync every file of ``staging`` and the folder, then put it at ``target``; an old ``target`` goes last."""
    for path in staging.rglob("*"):
        if path.is_file():
            fsync_path(path)
    fsync_path(staging)
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists() and _exchange(staging, target):  # one step: target is the new copy, staging the old one
        os.replace(staging, old)
    elif target.exists():
        os.replace(target, old)  # the old copy goes aside only now, and comes in again if the next step fails
        try:
            os.replace(staging, target)
        except BaseException:
            os.replace(old, target)
            raise
    else:
        os.replace(staging, target)
    fsync_path(target.parent)
    fault_point("folder-swapped")
    if old.exists():
        shutil.rmtree(old)


@contextmanager
def atomic_folder(target: str | Path, inputs: dict[str, Any] | None = None, *, manifest: bool = True,
                  staging: str | Path | None = None) -> Iterator[Path]:
    """Yield a staging folder; when the block ends without error it replaces ``target`` in one step.

    The staging folder is ``.<name>.partial-<pid>`` beside the target (or ``staging``). With ``manifest``,
    ``manifest.json`` (``inputs`` and each file's size and sha256) is written last. An error or a kill
    leaves the old ``target`` untouched; the next call removes the leftover.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(target)
    staging = Path(staging) if staging is not None else target.with_name(f".{target.name}.partial-{os.getpid()}")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        yield staging
        fault_point("folder-staged")
        if manifest:
            write_manifest(staging, inputs)
        commit_folder(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def target_lock(target: str | Path, *, what: str | None = None) -> Iterator[None]:
    """Hold ``fcntl.flock`` on ``.<name>.lock`` beside ``target``; a second process waits (and says so)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    lock_path = target.with_name(f".{target.name}.lock")
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.warning("Waiting for another process that is building %s (lock %s).", what or target, lock_path)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
