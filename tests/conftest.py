import os

import pytest
import torch
from torch import nn


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Never touch the user's cache; tox points ADVDETECT_CACHE_DIR at its own folder."""
    if not os.environ.get("ADVDETECT_CACHE_DIR"):
        os.environ["ADVDETECT_CACHE_DIR"] = str(tmp_path_factory.mktemp("advdetect-cache"))


class TinyCNN(nn.Module):
    """Conv, BatchNorm, ReLU, pooling and a linear head: every layer kind the default model has."""

    def __init__(self, num_classes: int = 3, channels: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 2 * 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x)))
        return self.head(nn.functional.adaptive_avg_pool2d(h, 2).flatten(1))


@pytest.fixture
def tiny_model() -> TinyCNN:
    torch.manual_seed(0)
    model = TinyCNN()
    with torch.no_grad():  # non-trivial running statistics, so eval mode differs from train mode
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.fixture
def tiny_inputs() -> torch.Tensor:
    return torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def one_thread():
    """Tiny models run faster on one thread than shared among threads, more so on a busy machine;
    modules of tiny-model tests use it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


pytest_plugins = ["pytester"]
