"""Atomic writes and checked checkpoint loading (`torch.load(..., weights_only=True)` only).

A checkpoint file holds {"format", "sha256", "payload"}: the payload is the torch-serialized state as
bytes and sha256 its hash, checked before the payload is deserialized. A file with damaged bytes is so
refused with one line instead of loading weights that train to NaN.
"""
from __future__ import annotations

import hashlib
import io
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from routerlab.errors import ConfigError
from routerlab.outputs import file_mode

FORMAT = "routerlab-checkpoint-v2"


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call write(tmp_path) on a temporary file beside `path`, then rename it into place.

    The file gets the mode a plain open() would give it (mkstemp makes 0600, unreadable to a team)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    record = {"format": FORMAT, "sha256": hashlib.sha256(payload).hexdigest(),
              "payload": torch.frombuffer(bytearray(payload), dtype=torch.uint8)}
    return atomic_write(path, lambda tmp: torch.save(record, tmp))


def load_checkpoint(path: str | Path, fingerprint: str | None = None) -> dict[str, Any]:
    """Load a checkpoint; a missing, corrupt or foreign file, or one from another config, is a ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {str(path)!r} does not exist")
    corrupt = f"checkpoint {str(path)!r} is corrupt or not a routerlab checkpoint"
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a damaged file
        raise ConfigError(f"{corrupt} ({type(err).__name__})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT or not isinstance(record.get("payload"), torch.Tensor):
        raise ConfigError(f"checkpoint {str(path)!r} is not a routerlab checkpoint (expected format {FORMAT})")
    payload = record["payload"].numpy().tobytes()
    digest = hashlib.sha256(payload).hexdigest()
    if digest != record.get("sha256"):
        raise ConfigError(f"checkpoint {str(path)!r} is damaged: its content hash is {digest[:12]}, it was saved as {str(record.get('sha256'))[:12]}; "
                          "use an intact copy or train again")
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConfigError(f"{corrupt} ({type(err).__name__})") from None
    if not isinstance(state, dict):
        raise ConfigError(f"{corrupt} (no state dict inside)")
    if fingerprint is not None and state.get("fingerprint") != fingerprint:
        raise ConfigError(
            f"checkpoint {str(path)!r} was written by a different config (fingerprint {state.get('fingerprint')}, this config {fingerprint}); "
            "resume with the config it was trained with"
        )
    return state
