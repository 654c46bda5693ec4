"""Out-of-distribution detection: the audited clean inputs against out-of-distribution sets.

Each set becomes one cell of the run folder, in place of an attack cell: ``adversarial/ood_<set>.npz``
holds one out-of-distribution input per correctly classified clean input (``x_adv``; ``fooled``
marks the rows that have one), so the detection stage and the report run unchanged, with the
out-of-distribution inputs as the positives. Built-in sets, all offline:

- ``uniform``: uniform noise images.
- ``corrupted``: the audited images under heavy Gaussian noise (sigma 0.5), clipped to [0, 1].
- ``photos``: random crops of the two photographs that ship with scikit-learn.
- ``digits``: scikit-learn's 8x8 handwritten digits (a different scanner and resolution), resized.

Any data spec (``npz:FILE``, ``folder:DIR``, ``cifar10:ROOT``, ...) is a set too; every set is
converted to the audited images' channels and size.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from advdetect.sources.datasets import DataOptions, load_data
from advdetect.errors import UsageError
from advdetect.progress import Progress, no_progress
from advdetect.run.records import OodRecord, derive_seed, ood_cell_key, ood_cell_slug
from advdetect.run.folder import cell_files, cell_paths, record_files, sample_arrays
from advdetect.run.storage import save_arrays, write_json

BUILTIN_SETS = ("uniform", "corrupted", "photos", "digits")
CORRUPTION_SIGMA = 0.5


def set_name(spec: str) -> str:
    return spec if spec in BUILTIN_SETS else re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(spec.partition(":")[2]).stem or spec)


def set_cells(specs: list[str]) -> list[tuple[str, str]]:
    """(key, file name) of each set's cell."""
    return [(ood_cell_key(set_name(s)), ood_cell_slug(set_name(s))) for s in specs]


def _fit(images: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Images [N, c, h, w] in [0, 1] to the audited shape [C, H, W]: grayscale <-> RGB, bilinear resize."""
    channels, height, width = shape
    if images.shape[1] != channels:
        images = images.mean(dim=1, keepdim=True) if channels == 1 else images[:, :1].repeat(1, channels, 1, 1)
    if images.shape[2:] != (height, width):
        images = F.interpolate(images, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    return images.clamp(0, 1).float()


def _photos(n: int, shape: tuple[int, ...], rng: np.random.Generator) -> torch.Tensor:
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    # crops of 4x the image side, resized down; no larger than the photos (427 x 640), for large images
    side = min(4 * max(shape[1:]), *(min(photo.shape[:2]) for photo in photos))
    crops = []
    for _ in range(n):
        photo = photos[rng.integers(len(photos))]
        top, left = rng.integers(photo.shape[0] - side + 1), rng.integers(photo.shape[1] - side + 1)
        crops.append(photo[top : top + side, left : left + side])
    return _fit(torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 255.0, shape)


def _digits(n: int, shape: tuple[int, ...], rng: np.random.Generator) -> torch.Tensor:
    from sklearn.datasets import load_digits

    images = load_digits().images / 16.0
    picks = rng.choice(len(images), size=min(n, len(images)), replace=False)
    return _fit(torch.from_numpy(images[picks]).unsqueeze(1).float(), shape)


def ood_inputs(spec: str, clean: torch.Tensor, seed: int) -> torch.Tensor:
    """Up to ``len(clean)`` out-of-distribution inputs shaped like ``clean``."""
    n, shape = len(clean), tuple(clean.shape[1:])
    rng = np.random.default_rng(derive_seed(seed, "ood", spec))
    if spec == "uniform":
        return torch.from_numpy(rng.random((n, *shape), dtype=np.float32))
    if spec == "corrupted":
        noise = torch.from_numpy(rng.standard_normal(clean.shape, dtype=np.float32))
        return (clean + CORRUPTION_SIGMA * noise).clamp(0, 1)
    if spec == "photos":
        return _photos(n, shape, rng)
    if spec == "digits":
        return _digits(n, shape, rng)
    if ":" not in spec:
        raise UsageError(f"unknown out-of-distribution set {spec!r}; give one of {', '.join(BUILTIN_SETS)} or a data "
                         f"spec such as npz:FILE or folder:DIR")
    data = load_data(spec, DataOptions(seed=seed))
    picks = rng.permutation(len(data.y))[:n]
    return _fit(data.x[torch.from_numpy(np.sort(picks))], shape)


def ood_stage(run_dir: Path, specs: list[str], seed: int, on_progress: Progress = no_progress) -> list[OodRecord]:
    """Write one cell per out-of-distribution set; the positives are paired by row with the
    correctly classified clean inputs."""
    sample = sample_arrays(run_dir)
    clean = torch.from_numpy(sample["x"][sample["pred"] == sample["y"]])
    records = []
    for index, spec in enumerate(specs):
        on_progress("ood", spec, index, len(specs))
        started = time.perf_counter()
        name = set_name(spec)
        inputs = ood_inputs(spec, clean, seed)
        x = np.zeros(clean.shape, dtype=np.float32)
        x[: len(inputs)] = inputs.numpy()
        present = np.arange(len(clean)) < len(inputs)
        record = OodRecord.for_set(name, spec, index, seed=seed, n_clean=len(clean), n_inputs=int(present.sum()),
                                   seconds=round(time.perf_counter() - started, 3))
        record_path, arrays_path = cell_paths(run_dir, record.slug)
        save_arrays(arrays_path, x_adv=x, fooled=present)
        write_json(record_path, record.to_dict())
        record_files(run_dir, cell_files(record.slug))
        records.append(record)
    return records
