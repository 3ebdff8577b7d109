"""Output folders: checked before any work starts, locked against a second process, cleaned of the
temporary files a killed process left behind, and written with the permissions the umask asks for.

    lock = lock_output_dir("runs/x", "run.dir")   # ConfigError: not writable, or in use by PID N
    ...
    lock.release()

The lock is `fcntl.flock` on `<folder>/.routerlab.lock`: the kernel drops it when the process dies, even
by kill -9, so a stale lock never blocks a rerun. Inside one process the same folder may be locked again
(a resumed Trainer, a test); the guard is against other processes.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from routerlab.errors import ConfigError

LOCK_NAME = ".routerlab.lock"
TMP_GLOB = ".*.tmp"  # atomic_write's temporary files: .<name>.<random>.tmp

_held: dict[str, list] = {}  # resolved folder -> [fd, count] for the locks this process holds


def file_mode() -> int:
    """The mode a plain open() would give a new file (0o666 minus the umask)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def check_writable(path: str | Path, what: str) -> Path:
    """Check, without creating anything, that `path` is or can become a writable folder (bad input: ConfigError)."""
    path = Path(path)
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe != path and probe.exists() and not probe.is_dir():
        raise ConfigError(f"{what} {str(path)!r} cannot be created: {str(probe)!r} is a file; give a folder path")
    if probe == path and not path.is_dir():
        raise ConfigError(f"{what} {str(path)!r} exists and is not a folder; give a folder path")
    if not os.access(probe, os.W_OK | os.X_OK):
        where = "" if probe == path else f" (its existing parent {str(probe)!r} is not writable)"
        raise ConfigError(f"{what} {str(path)!r} is not writable{where}; give a writable folder")
    try:  # access() says yes to root everywhere; a real (immediately removed) file tells the truth
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as err:
        raise ConfigError(f"{what} {str(path)!r} is not writable ({err.strerror} in {str(probe)!r}); give a writable folder") from None
    return path


def ensure_writable_dir(path: str | Path, what: str) -> Path:
    """Create `path` if needed and check that files can be written in it; else one ConfigError line."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"{what} {str(path)!r} exists and is not a folder; give a folder path") from None
    except OSError as err:
        raise ConfigError(f"{what} {str(path)!r} cannot be created: {err.strerror}; give a writable folder") from None
    if not path.is_dir():
        raise ConfigError(f"{what} {str(path)!r} exists and is not a folder; give a folder path")
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {str(path)!r} is not writable; give a writable folder")
    return path


def clean_stale_tmp(path: str | Path) -> list[Path]:
    """Remove the temporary files of atomic writes that a killed process left in `path` (call under the lock)."""
    removed = []
    for tmp in Path(path).glob(TMP_GLOB):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


class FolderLock:
    def __init__(self, key: str) -> None:
        self.key = key

    def release(self) -> None:
        entry = _held.get(self.key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            os.close(entry[0])  # closing the descriptor drops the flock
            del _held[self.key]
        self.key = ""

    def __del__(self) -> None:
        self.release()

    def __enter__(self) -> "FolderLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock_output_dir(path: str | Path, what: str, clean: bool = True) -> FolderLock:
    """Check `path` is a writable folder, lock it for this process, then remove stale temporary files."""
    import fcntl

    path = ensure_writable_dir(path, what)
    key = str(path.resolve())
    if key in _held:
        _held[key][1] += 1
        return FolderLock(key)
    lock_file = path / LOCK_NAME
    try:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, file_mode())
    except OSError as err:
        raise ConfigError(f"{what} {str(path)!r}: cannot create its lock file: {err.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        finally:
            os.close(fd)
        raise ConfigError(f"{what} {str(path)!r} is already in use by PID {owner}; wait for it to finish, stop it, or choose another folder") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[key] = [fd, 1]
    if clean:
        clean_stale_tmp(path)
    return FolderLock(key)
