"""A content-addressed cache of adversarial inputs, so a repeated audit redoes no attack work.

An entry's key hashes everything its numbers depend on: the model's weights, the attacked
inputs and labels, the attack and its constructor parameters, the seed, the batch size, the
device type and the library versions. Entries are written atomically; one that does not read
back whole and matching (truncated, corrupt, another key, another shape) is recomputed, never
trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from advdetect.storage import load_arrays, save_arrays, user_cache_dir

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    return user_cache_dir() / "attacks"


def tensor_sha256(*tensors: torch.Tensor) -> str:
    digest = hashlib.sha256()
    for tensor in tensors:
        array = tensor.detach().cpu().contiguous().numpy()
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class AttackCache:
    root: Path

    def key(self, **parts: Any) -> str:
        parts = {**parts, "torch": torch.__version__, "torchattacks": metadata.version("torchattacks")}
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.npz"

    def load(self, key: str, like: torch.Tensor) -> torch.Tensor | None:
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            arrays = load_arrays(path)
            x_adv = arrays["x_adv"]
            if str(arrays["key"]) != key or x_adv.shape != tuple(like.shape) or x_adv.dtype != np.float32 \
                    or not np.isfinite(x_adv).all():
                raise ValueError("content does not match its key")
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            log.warning("cache entry %s is unreadable (%s); recomputing it", path, exc)
            return None
        return torch.from_numpy(x_adv)

    def store(self, key: str, x_adv: torch.Tensor) -> None:
        """Keep an entry; a cache that cannot be written (full disk, no permission) costs a warning,
        never the audit's work."""
        try:
            save_arrays(self.path(key), key=np.array(key), x_adv=x_adv.numpy())
        except OSError as exc:
            log.warning("cannot write the attack cache entry %s (%s); the audit goes on without it",
                        self.path(key), exc.strerror or exc)
