import gzip
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat

from advdetect.sources.embedded import NUM_CLASSES, TEST_PER_CLASS, mnist_splits, test_split
from advdetect.errors import UsageError
from advdetect.sources.datasets import DataOptions, load_data, stratified_indices


def test_stratified_sample_is_balanced_deterministic_and_seeded():
    labels = np.repeat(np.arange(4), [10, 10, 10, 3])
    picked = stratified_indices(labels, 14, seed=0)
    assert np.bincount(labels[picked]).tolist() == [4, 4, 3, 3]  # round-robin over classes, the small one runs out
    assert np.array_equal(picked, stratified_indices(labels, 14, seed=0))
    assert not np.array_equal(picked, stratified_indices(labels, 14, seed=1))
    assert len(set(picked)) == 14


@pytest.mark.slow
def test_default_data_is_the_shipped_test_split_disjoint_from_training():
    (x_train, _), (x_test, y_test) = mnist_splits()
    shipped_x, shipped_y = test_split()
    assert shipped_x.shape == (NUM_CLASSES * TEST_PER_CLASS, 1, 28, 28) and len(x_train) == 4000
    assert np.array_equal(shipped_x.numpy(), x_test.reshape(-1, 1, 28, 28).astype(np.float32) / 255)
    assert np.array_equal(shipped_y.numpy(), y_test)
    assert np.bincount(y_test).tolist() == [TEST_PER_CLASS] * NUM_CLASSES
    train_rows = {row.tobytes() for row in x_train.reshape(len(x_train), -1)}
    assert not any(row.tobytes() in train_rows for row in x_test.reshape(len(x_test), -1))
    sample = load_data("default", DataOptions(n=30, seed=0))
    assert sample.x.shape == (30, 1, 28, 28) and 0 <= sample.x.min() and sample.x.max() <= 1
    assert sorted(np.bincount(sample.y.numpy()).tolist()) == [3] * 10


RNG = np.random.default_rng(0)
IMAGES = RNG.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)  # NHWC
LABELS = np.array([0, 1, 2, 0, 1, 2])


def as_nchw(images: np.ndarray) -> np.ndarray:
    return images.transpose(0, 3, 1, 2).astype(np.float32) / 255


def write_folder(root, images=IMAGES, labels=LABELS, names=("cat", "dog", "emu")):
    for i, (image, label) in enumerate(zip(images, labels)):
        (root / names[label]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / names[label] / f"{i}.png")
    return root


def test_folder_classes_are_sorted_subfolders_and_pixels_survive(tmp_path):
    sample = load_data(f"folder:{write_folder(tmp_path)}")
    assert sample.info["classes"] == ["cat", "dog", "emu"]
    order = np.argsort(LABELS, kind="stable")  # files are read class by class
    assert sample.y.tolist() == LABELS[order].tolist()
    np.testing.assert_array_equal(sample.x.numpy(), as_nchw(IMAGES[order]))


def test_folder_converts_to_the_models_channels_and_resizes(tmp_path):
    root = write_folder(tmp_path)
    gray = load_data(f"folder:{root}", DataOptions(channels=1, image_size=4))
    assert gray.x.shape == (6, 1, 4, 4)
    small = load_data(f"folder:{root}", DataOptions(n=3, seed=0))
    assert sorted(small.y.tolist()) == [0, 1, 2] and small.x.shape == (3, 3, 8, 8)


def test_folder_errors(tmp_path):
    root = write_folder(tmp_path / "data")
    (root / "fox").mkdir()
    with pytest.raises(UsageError, match=r"class folder .*fox holds no PNG or JPEG image"):
        load_data(f"folder:{root}")
    (root / "fox" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(UsageError, match=r"cannot read image .*broken.png"):
        load_data(f"folder:{root}")
    Image.fromarray(IMAGES[0][:4]).save(root / "fox" / "broken.png")
    with pytest.raises(UsageError, match=r"different sizes .*pass --image-size"):
        load_data(f"folder:{root}")
    assert load_data(f"folder:{root}", DataOptions(image_size=8)).x.shape == (7, 3, 8, 8)
    with pytest.raises(UsageError, match="has no class subfolders"):
        load_data(f"folder:{root / 'cat'}")
    with pytest.raises(UsageError, match="image folder .* not found"):
        load_data(f"folder:{tmp_path / 'nope'}")


@pytest.mark.parametrize(("kind", "folder", "file", "key"), [
    ("cifar10", "cifar-10-batches-py", "test_batch", b"labels"),
    ("cifar100", "cifar-100-python", "test", b"fine_labels"),
])
def test_cifar_pickle_batches(tmp_path, kind, folder, file, key):
    # the official layout: each row holds the red plane, then green, then blue, each 32x32 row-major
    images = RNG.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    rows = images.transpose(0, 3, 1, 2).reshape(4, 3072)
    (tmp_path / folder).mkdir()
    with open(tmp_path / folder / file, "wb") as handle:
        pickle.dump({b"data": rows, key: [3, 1, 4, 1], b"filenames": [b"a.png"] * 4}, handle, protocol=2)
    for root in (tmp_path, tmp_path / folder, tmp_path / folder / file):
        sample = load_data(f"{kind}:{root}")
        assert sample.y.tolist() == [3, 1, 4, 1]
        np.testing.assert_array_equal(sample.x.numpy(), as_nchw(images))


def test_cifar_loader_refuses_pickles_that_run_code(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (print, ("owned",))

    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": Exploit(), b"labels": []}))
    with pytest.raises(UsageError, match="not a CIFAR python batch .*refusing to load builtins.print"):
        load_data(f"cifar10:{tmp_path}")


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_files(tmp_path, gz):
    images = RNG.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([7, 2, 1, 0, 4], dtype=np.uint8)
    for stem, array in (("t10k-images-idx3-ubyte", images), ("t10k-labels-idx1-ubyte", labels)):
        data = idx_bytes(array)
        (tmp_path / (stem + (".gz" if gz else ""))).write_bytes(gzip.compress(data) if gz else data)
    sample = load_data(f"mnist:{tmp_path}")
    assert sample.y.tolist() == [7, 2, 1, 0, 4]
    np.testing.assert_array_equal(sample.x.numpy(), images[:, None] / np.float32(255))
    rgb = load_data(f"mnist:{tmp_path}", DataOptions(channels=3))
    assert rgb.x.shape == (5, 3, 28, 28) and torch.equal(rgb.x[:, 0], rgb.x[:, 2])


def test_mnist_errors(tmp_path):
    with pytest.raises(UsageError, match="MNIST t10k-images-idx3-ubyte not found under"):
        load_data(f"mnist:{tmp_path}")
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + (9).to_bytes(4, "big") * 3)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(9)))
    with pytest.raises(UsageError, match=r"header says \(9, 9, 9\) but the file holds 0 values"):
        load_data(f"mnist:{tmp_path}")


def test_svhn_mat_file_maps_label_10_to_digit_0(tmp_path):
    images = RNG.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    savemat(tmp_path / "test_32x32.mat", {"X": images.transpose(1, 2, 3, 0), "y": np.array([[10], [1], [9]])})
    sample = load_data(f"svhn:{tmp_path}")
    assert sample.y.tolist() == [0, 1, 9]
    np.testing.assert_array_equal(sample.x.numpy(), as_nchw(images))


def test_npz_uint8_nhwc_and_float_nchw(tmp_path):
    np.savez(tmp_path / "u8.npz", x=IMAGES, y=LABELS)
    np.savez(tmp_path / "f32.npz", x=as_nchw(IMAGES), y=LABELS)
    for name in ("u8.npz", "f32.npz"):
        sample = load_data(f"npz:{tmp_path / name}")
        np.testing.assert_allclose(sample.x.numpy(), as_nchw(IMAGES))
        assert sample.y.tolist() == LABELS.tolist()


@pytest.mark.parametrize(("arrays", "message"), [
    ({"x": as_nchw(IMAGES) * 2, "y": LABELS}, r"values in \[0, 2\]; images must lie in \[0, 1\]"),
    ({"images": IMAGES, "y": LABELS}, r"must hold arrays 'x' and 'y'; it holds images, y"),
    ({"x": IMAGES[:, :, :, 0], "y": LABELS}, r"'x' must be 4-D images"),
    ({"x": IMAGES, "y": LABELS[:3]}, r"'y' must be 6 integer labels"),
])
def test_npz_errors(tmp_path, arrays, message):
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(UsageError, match=message):
        load_data(f"npz:{tmp_path / 'd.npz'}")


def test_bad_data_specs_are_clear_errors(tmp_path):
    np.savez(tmp_path / "d.npz", x=IMAGES, y=LABELS)
    with pytest.raises(UsageError, match="has 3-channel images but the model takes 1 channels"):
        load_data(f"npz:{tmp_path / 'd.npz'}", DataOptions(channels=1))
    with pytest.raises(UsageError, match=r"--n 5000 asks for more inputs than data 'default' holds \(1000\)"):
        load_data("default", DataOptions(n=5000))
    with pytest.raises(UsageError, match="data spec 'foo:bar' not understood; give default or one of folder:PATH"):
        load_data("foo:bar")
    with pytest.raises(UsageError, match="data file .*missing.npz' not found"):
        load_data(f"npz:{tmp_path / 'missing.npz'}")
