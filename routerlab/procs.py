"""Worker processes that die with their parent, so a kill -9 of a command leaves no process behind.

On Linux the kernel does it: prctl(PR_SET_PDEATHSIG, SIGKILL). A watchdog thread that polls the parent's
PID covers other systems and the window before prctl took effect.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1


def set_parent_death_signal() -> bool:
    """Ask the kernel to SIGKILL this process when its parent exits (Linux); True when it took effect."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent: int, interval: float) -> None:
    while True:
        if os.getppid() != parent:
            os._exit(1)  # the parent is gone; nobody will collect this worker's result
        time.sleep(interval)


def die_with_parent(parent: int | None = None, interval: float = 1.0) -> None:
    """Call first thing in a worker process: it ends as soon as `parent` (default: the current parent) ends."""
    parent = os.getppid() if parent is None else parent
    set_parent_death_signal()
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent, interval), name="parent-watchdog", daemon=True).start()


def init_worker(parent: int, then: str, *args) -> None:
    """A process-pool initializer that arms die_with_parent before anything heavy is imported: `then` is the
    real initializer as "module:function", imported only afterwards (unpickling a function reference would
    import its module, torch included, while the worker is still unprotected)."""
    die_with_parent(parent)
    import importlib

    module, name = then.split(":")
    getattr(importlib.import_module(module), name)(*args)
