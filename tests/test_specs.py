import numpy as np
import pytest

from advdetect.embedded import NUM_CLASSES, TEST_PER_CLASS, mnist_splits
from advdetect.errors import UsageError
from advdetect.specs import load_data, load_model, stratified_indices


def test_stratified_sample_is_balanced_deterministic_and_seeded():
    labels = np.repeat(np.arange(4), [10, 10, 10, 3])
    picked = stratified_indices(labels, 14, seed=0)
    assert np.bincount(labels[picked]).tolist() == [4, 4, 3, 3]  # round-robin over classes, the small one runs out
    assert np.array_equal(picked, stratified_indices(labels, 14, seed=0))
    assert not np.array_equal(picked, stratified_indices(labels, 14, seed=1))
    assert len(set(picked)) == 14


def test_default_data_is_the_test_split_disjoint_from_training():
    (x_train, _), (x_test, y_test) = mnist_splits()
    assert x_test.shape == (NUM_CLASSES * TEST_PER_CLASS, 1, 28, 28) and len(x_train) == 4000
    assert np.bincount(y_test).tolist() == [TEST_PER_CLASS] * NUM_CLASSES
    train_rows = {row.tobytes() for row in x_train.reshape(len(x_train), -1)}
    assert not any(row.tobytes() in train_rows for row in x_test.reshape(len(x_test), -1))
    sample = load_data("default", n=30, seed=0)
    assert sample.x.shape == (30, 1, 28, 28) and 0 <= sample.x.min() and sample.x.max() <= 1
    assert sorted(np.bincount(sample.y.numpy()).tolist()) == [3] * 10


def test_bad_specs_are_clear_errors():
    with pytest.raises(UsageError, match="unknown model spec 'nope'; valid: default"):
        load_model("nope")
    with pytest.raises(UsageError, match="--weights does not apply to --model default"):
        load_model("default", weights="w.pt")
    with pytest.raises(UsageError, match=r"--n 5000 asks for more inputs than data 'default' holds \(1000\)"):
        load_data("default", n=5000, seed=0)
    with pytest.raises(UsageError, match="unknown data spec 'foo:bar'; valid: default"):
        load_data("foo:bar", n=10, seed=0)
