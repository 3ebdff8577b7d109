"""Atomic writes and checked checkpoint loading (`torch.load(..., weights_only=True)` only)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from routerlab.errors import ConfigError

FORMAT = "routerlab-checkpoint-v1"


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call write(tmp_path) on a temporary file beside `path`, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    return atomic_write(path, lambda tmp: torch.save({"format": FORMAT, **state}, tmp))


def load_checkpoint(path: str | Path, fingerprint: str | None = None) -> dict[str, Any]:
    """Load a checkpoint; a missing, corrupt or foreign file, or one from another config, is a ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a damaged file
        raise ConfigError(f"checkpoint {str(path)!r} is corrupt or not a routerlab checkpoint ({type(err).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ConfigError(f"checkpoint {str(path)!r} is not a routerlab checkpoint (expected format {FORMAT})")
    if fingerprint is not None and state.get("fingerprint") != fingerprint:
        raise ConfigError(
            f"checkpoint {str(path)!r} was written by a different config (fingerprint {state.get('fingerprint')}, this config {fingerprint}); "
            "resume with the config it was trained with"
        )
    return state
