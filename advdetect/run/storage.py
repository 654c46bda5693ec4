"""On-disk artifacts: atomic writes (temporary file, then rename), JSON and npz without pickles."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

import numpy as np


def user_cache_dir() -> Path:
    """``$ADVDETECT_CACHE_DIR``, else ``$XDG_CACHE_HOME/advdetect``, else ``~/.cache/advdetect``."""
    if os.environ.get("ADVDETECT_CACHE_DIR"):
        return Path(os.environ["ADVDETECT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "advdetect"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write through ``write(file)`` to a temporary file beside ``path``, then rename it into place:
    readers see the old file or the whole new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def write_json(path: Path, obj: Any) -> None:
    write_bytes(path, (json.dumps(obj, indent=2, allow_nan=False) + "\n").encode())


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def read_json(path: Path) -> Any:
    """JSON as advdetect writes it: NaN and Infinity, which the standard forbids, are refused."""
    return json.loads(path.read_text(encoding="utf-8"), parse_constant=_no_constants)


def save_arrays(path: Path, **arrays: np.ndarray) -> None:
    atomic_write(path, lambda f: np.savez(f, **arrays))


def load_arrays(path: Path, keys: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """The arrays of an npz archive (only ``keys`` of them, when given); ValueError for anything
    else (numpy would try it as a pickle)."""
    with path.open("rb") as handle:
        if handle.read(4) not in (b"PK\x03\x04", b"PK\x05\x06"):  # a zip file; the second, an empty one
            raise ValueError("not an npz archive (numpy.savez writes a zip file)")
    with np.load(path, allow_pickle=False) as data:
        wanted = data.files if keys is None else [k for k in keys if k in data.files]
        return {key: data[key] for key in wanted}
