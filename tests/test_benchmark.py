import pytest
import torch

from advdetect.cli.bench import CifarResNet18, peak_memory, vmap_features
from advdetect.signatures.features import per_sample_loop_features


@pytest.mark.slow
def test_peak_memory_grows_with_the_chunk_not_with_a_large_parent():
    parent_peak = torch.ones(400_000_000, dtype=torch.uint8) + 1  # the child must not inherit this peak
    small, large = peak_memory(48, 4)["peak_growth_mib"], peak_memory(48, 48)["peak_growth_mib"]
    assert 0 < small < large
    del parent_peak


def test_vmap_reference_matches_the_loop():
    torch.manual_seed(0)
    model = CifarResNet18(num_classes=3).double().eval()
    inputs = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(vmap_features(model, inputs), per_sample_loop_features(model, inputs))
