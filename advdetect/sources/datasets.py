"""Data specs (``--data``): every loader yields images as float32 NCHW in [0, 1] and int64 labels.

- ``default``: the embedded MNIST test split (:mod:`advdetect.sources.embedded`).
- ``folder:DIR``: one subfolder per class (class index = sorted subfolder names), PNG or JPEG;
  ``--image-size``/``--crop`` resize the shorter side and center-crop, as ImageNet evaluation does.
- ``cifar10:ROOT``, ``cifar100:ROOT``: the python pickle batches of the official tarballs
  (``cifar-10-batches-py/test_batch``, ``cifar-100-python/test``).
- ``mnist:ROOT``: the test idx files, gzipped or not.
- ``svhn:ROOT``: ``test_32x32.mat``.
- ``npz:FILE``: ``x`` as uint8 NHWC or float NCHW in [0, 1], and ``y``.

Other data is squashed to ``--image-size`` square when given; ``--crop`` applies to folders only.

``--n`` draws a seeded, class-stratified sample before any image is decoded; up to
``--n-reference`` further inputs, disjoint from it and drawn the same way, form the clean
reference set that detectors fit on (class-conditional Gaussians, densities, one-class fits).
"""

from __future__ import annotations

import gzip
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from advdetect.errors import UsageError
from advdetect.run.storage import load_arrays

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class DataOptions:
    n: int | None = None
    seed: int = 0
    image_size: int | None = None
    #: folder images: center crop side (after resizing the shorter side to ``image_size``, or to
    #: ``round(crop / 0.875)`` without it, ImageNet's 256 -> 224)
    crop: int | None = None
    #: channels the model takes; folder images are converted to them (RGB or grayscale)
    channels: int | None = None
    n_reference: int = 0


@dataclass
class DataSample:
    x: torch.Tensor
    y: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)
    reference_x: torch.Tensor | None = None
    reference_y: torch.Tensor | None = None


def stratified_indices(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` indices drawn class by class in turn (each class shuffled by ``seed``), so every
    class is represented as evenly as ``n`` allows; returned sorted."""
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    order = [idx[i] for i in range(max(map(len, per_class), default=0)) for idx in per_class if i < len(idx)]
    return np.sort(np.asarray(order[:n], dtype=np.int64))


class _Source:
    """Labels up front, pixels on demand: folders decode only the sampled images."""

    def __init__(self, labels: np.ndarray, images: Callable[[np.ndarray], np.ndarray], info: dict[str, Any]) -> None:
        self.labels, self.images, self.info = labels, images, info


def _in_memory(x: np.ndarray, y: np.ndarray, info: dict[str, Any]) -> _Source:
    return _Source(y, lambda index: x[index], info)


def _find(root: Path, candidates: list[str], what: str) -> Path:
    if root.is_file():
        return root
    for candidate in candidates:
        if (root / candidate).is_file():
            return root / candidate
    raise UsageError(f"{what} not found under {root}: looked for {', '.join(candidates)}")


def _uint8_nhwc(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)).astype(np.float32) / 255.0


# --- loaders -------------------------------------------------------------------------------

def _default(arg: str, options: DataOptions) -> _Source:
    from advdetect.sources.embedded import test_split

    x, y = test_split()
    return _in_memory(x.numpy(), y.numpy(),
                      {"source": "the embedded MNIST test split (1000 digits, disjoint from training)"})


class _ArrayUnpickler(pickle.Unpickler):
    """CIFAR's batches are pickles; allow the NumPy array machinery and nothing else."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")
        return super().find_class(module, name)


def _cifar(arg: str, options: DataOptions, *, folder: str, file: str, label_key: bytes) -> _Source:
    path = _find(Path(arg), [f"{folder}/{file}", file], f"CIFAR test batch ({folder}/{file})")
    try:
        with path.open("rb") as handle:
            batch = _ArrayUnpickler(handle, encoding="bytes").load()
        data, labels = np.asarray(batch[b"data"], dtype=np.uint8), np.asarray(batch[label_key], dtype=np.int64)
        x = _uint8_nhwc(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    except Exception as exc:
        raise UsageError(f"{path} is not a CIFAR python batch ({type(exc).__name__}: {exc})") from None
    return _in_memory(x, labels, {"source": str(path)})


def _read_idx(path: Path) -> np.ndarray:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError("not an idx file of unsigned bytes")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"header says {shape} but the file holds {data.size} values")
    return data.reshape(shape)


def _mnist(arg: str, options: DataOptions) -> _Source:
    root = Path(arg)
    found = []
    for stem in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        names = [f"{stem}{suffix}" for suffix in ("", ".gz")]
        found.append(_find(root, names + [f"MNIST/raw/{n}" for n in names], f"MNIST {stem}"))
    try:
        images, labels = (_read_idx(p) for p in found)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read MNIST idx files under {root}: {exc}") from None
    if images.ndim != 3 or len(images) != len(labels):
        raise UsageError(f"MNIST idx files under {root} disagree: images {images.shape}, labels {labels.shape}")
    return _in_memory(images[:, None].astype(np.float32) / 255.0, labels.astype(np.int64), {"source": str(found[0])})


def _svhn(arg: str, options: DataOptions) -> _Source:
    from scipy.io import loadmat

    path = _find(Path(arg), ["test_32x32.mat"], "SVHN test_32x32.mat")
    try:
        mat = loadmat(path)
        x = _uint8_nhwc(np.asarray(mat["X"], dtype=np.uint8).transpose(3, 0, 1, 2))
        y = np.asarray(mat["y"], dtype=np.int64).ravel() % 10  # SVHN labels the digit 0 as 10
    except Exception as exc:
        raise UsageError(f"{path} is not an SVHN .mat file ({type(exc).__name__}: {exc})") from None
    return _in_memory(x, y, {"source": str(path)})


def _npz(arg: str, options: DataOptions) -> _Source:
    path = Path(arg)
    if not path.is_file():
        raise UsageError(f"data file {arg!r} not found")
    try:
        data = load_arrays(path)
    except Exception as exc:
        reason = "it holds Python objects, which are not read" if "allow_pickle" in str(exc) else str(exc)
        raise UsageError(f"cannot read data {path}: {reason}; give an npz archive with arrays x and y") from None
    if "x" not in data or "y" not in data:
        raise UsageError(f"{path} must hold arrays 'x' and 'y'; it holds {', '.join(data) or 'none'}")
    x, y = data["x"], data["y"]
    if x.ndim != 4:
        raise UsageError(f"{path}: 'x' must be 4-D images (uint8 NHWC or float NCHW); got shape {x.shape}")
    if x.dtype == np.uint8:
        x = _uint8_nhwc(x)
    elif np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
    else:
        raise UsageError(f"{path}: 'x' must be uint8 NHWC or float NCHW in [0, 1]; got dtype {x.dtype}")
    if not np.issubdtype(y.dtype, np.integer) or y.shape != (len(x),):
        raise UsageError(f"{path}: 'y' must be {len(x)} integer labels; got {y.dtype} {y.shape}")
    return _in_memory(x, y.astype(np.int64), {"source": str(path)})


#: ImageNet evaluation's ratio of center crop to resized shorter side (224 / 256).
CROP_RATIO = 0.875


def folder_geometry(options: DataOptions) -> tuple[int | None, int | None]:
    """(shorter side to resize folder images to, side of their center crop); (None, None) keeps
    them as they are. The sizes were checked with the audit's options (a crop of at least 1 and
    at most ``image_size``: :data:`advdetect.config.options.AUDIT_OPTIONS`)."""
    if options.crop is not None:
        return options.image_size or round(options.crop / CROP_RATIO), options.crop
    if options.image_size:
        return options.image_size, options.image_size
    return None, None


def _resize_and_crop(image: Any, shorter: int, crop: int) -> Any:
    """``image`` (PIL) with its shorter side resized to ``shorter`` keeping the aspect ratio, then
    center-cropped to ``crop`` x ``crop``, with torchvision's ``Resize(int)`` and ``CenterCrop``
    arithmetic."""
    from PIL import Image

    width, height = image.size
    if width <= height:
        size = (shorter, int(shorter * height / width))
    else:
        size = (int(shorter * width / height), shorter)
    if size != image.size:
        image = image.resize(size, Image.BILINEAR)
    left, top = int(round((size[0] - crop) / 2.0)), int(round((size[1] - crop) / 2.0))
    return image.crop((left, top, left + crop, top + crop))


def _folder(arg: str, options: DataOptions) -> _Source:
    from PIL import Image

    root = Path(arg)
    if not root.is_dir():
        raise UsageError(f"image folder {arg!r} not found")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise UsageError(f"{root} has no class subfolders; lay images out as {root}/<class>/<image>.png")
    files, labels = [], []
    for index, name in enumerate(classes):
        images = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise UsageError(f"class folder {root / name} holds no PNG or JPEG image")
        files += images
        labels += [index] * len(images)
    mode = {1: "L", 3: "RGB"}.get(options.channels or 3, "RGB")
    shorter, crop = folder_geometry(options)

    def decode(index: np.ndarray) -> np.ndarray:
        arrays = []
        for i in index:
            try:
                with Image.open(files[i]) as image:
                    image = image.convert(mode)
                    if shorter is not None and crop is not None:
                        image = _resize_and_crop(image, shorter, crop)
                    arrays.append(np.asarray(image, dtype=np.uint8))
            except Exception as exc:
                raise UsageError(f"cannot read image {files[i]}: {type(exc).__name__}: {exc}") from None
        sizes = sorted({a.shape[:2] for a in arrays})
        if len(sizes) > 1:
            raise UsageError(f"images in {root} have different sizes ({sizes[0]} and {sizes[-1]}); "
                             f"pass --image-size or --crop")
        stacked = np.stack(arrays)
        return _uint8_nhwc(stacked if stacked.ndim == 4 else stacked[..., None])

    info: dict[str, Any] = {"source": str(root), "classes": classes}
    if shorter is not None:
        info["preprocessing"] = f"shorter side resized to {shorter}, center crop {crop}x{crop}"
    return _Source(np.asarray(labels, dtype=np.int64), decode, info)


DATA_LOADERS: dict[str, Callable[[str, DataOptions], _Source]] = {
    "default": _default,
    "folder": _folder,
    "cifar10": lambda arg, o: _cifar(arg, o, folder="cifar-10-batches-py", file="test_batch", label_key=b"labels"),
    "cifar100": lambda arg, o: _cifar(arg, o, folder="cifar-100-python", file="test", label_key=b"fine_labels"),
    "mnist": _mnist,
    "svhn": _svhn,
    "npz": _npz,
}


def _match_channels(x: np.ndarray, channels: int | None, spec: str) -> np.ndarray:
    if channels is None or x.shape[1] == channels:
        return x
    if x.shape[1] == 1 and channels == 3:
        return np.repeat(x, 3, axis=1)
    raise UsageError(f"data {spec!r} has {x.shape[1]}-channel images but the model takes {channels} channels")


def load_data(spec: str, options: DataOptions = DataOptions()) -> DataSample:
    kind, _, arg = spec.partition(":")
    if kind not in DATA_LOADERS or (kind != "default" and not arg) or (kind == "default" and arg):
        raise UsageError(f"data spec {spec!r} not understood; give default or one of "
                         f"{', '.join(k + ':PATH' for k in DATA_LOADERS if k != 'default')}")
    if kind != "folder":
        _refuse_crop(spec, options)
    return _sample(DATA_LOADERS[kind](arg, options), kind, spec, options)


#: How in-memory data is named in results.
TENSORS_SPEC = "tensors"


def sample_tensors(x: torch.Tensor, y: torch.Tensor, options: DataOptions = DataOptions()) -> DataSample:
    """The audited and reference samples drawn from in-memory images ``x`` (float [N, C, H, W] in
    [0, 1]) and labels ``y``, exactly as from a data spec."""
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise UsageError(f"data must be a spec or a pair of tensors (images, labels); got {type(x).__name__}, "
                         f"{type(y).__name__}")
    if x.ndim != 4 or not x.is_floating_point() or len(x) != len(y):
        raise UsageError(f"in-memory data must be float images [N, C, H, W] and N labels; got {x.dtype} "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    _refuse_crop(TENSORS_SPEC, options)
    images = x.detach().cpu().float().numpy()
    return _sample(_in_memory(images, y.detach().cpu().numpy(), {"source": "in-memory tensors"}), TENSORS_SPEC,
                   TENSORS_SPEC, options)


def _refuse_crop(spec: str, options: DataOptions) -> None:
    if options.crop is not None:
        raise UsageError(f"--crop applies to folder:DIR images only (resize the shorter side, then center-crop); "
                         f"data {spec!r} is not a folder: use --image-size, which resizes it to a square")


def _sample(source: _Source, kind: str, spec: str, options: DataOptions) -> DataSample:
    labels = np.asarray(source.labels)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise UsageError(f"data {spec!r} has labels of dtype {labels.dtype} and shape {labels.shape}; labels must be "
                         f"whole-number class indices, one per image")
    if len(labels) and labels.min() < 0:
        raise UsageError(f"data {spec!r} has negative labels (down to {labels.min()}); labels must be class indices "
                         f"0 to C-1 (drop unlabelled images, often marked -1)")
    labels = labels.astype(np.int64)
    if options.n is not None:
        if options.n < 1:
            raise UsageError(f"--n must be at least 1; got {options.n}")
        if options.n > len(labels):
            raise UsageError(f"--n {options.n} asks for more inputs than data {spec!r} holds ({len(labels)}); "
                             "lower --n")
        index = stratified_indices(labels, options.n, options.seed)
    else:
        index = np.arange(len(labels))
    rest = np.setdiff1d(np.arange(len(labels)), index)
    reference = rest[stratified_indices(labels[rest], min(options.n_reference, len(rest)), options.seed + 1)]
    both = _images(source, np.r_[index, reference], kind, spec, options)
    x, reference_x = both[: len(index)], both[len(index) :]
    info = {"spec": spec, "n": int(len(index)), "n_available": int(len(labels)), "n_reference": int(len(reference)),
            "shape": list(x.shape[1:]), "num_classes": int(len(np.unique(labels))), "sample_seed": options.seed,
            **source.info}
    return DataSample(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(labels[index]), info,
                      torch.from_numpy(np.ascontiguousarray(reference_x)), torch.from_numpy(labels[reference]))


def _images(source: _Source, index: np.ndarray, kind: str, spec: str, options: DataOptions) -> np.ndarray:
    order = np.argsort(index, kind="stable")  # loaders read indices in ascending order
    x = np.empty(0)
    if len(index):
        x = source.images(index[order])[np.argsort(order)]
    x = _match_channels(x, options.channels, spec)
    if options.image_size and kind != "folder" and x.shape[2:] != (options.image_size, options.image_size):
        x = torch.nn.functional.interpolate(torch.from_numpy(x), size=(options.image_size,) * 2, mode="bilinear",
                                            align_corners=False).clamp(0, 1).numpy()
    if x.size and not np.isfinite(x).all():
        raise UsageError(f"data {spec!r} holds NaN or infinite pixel values; images must lie in [0, 1]")
    low, high = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
    if low < 0.0 or high > 1.0:
        raise UsageError(f"data {spec!r} has values in [{low:.3g}, {high:.3g}]; images must lie in [0, 1] "
                         f"(uint8 images are scaled by 1/255)")
    return x
