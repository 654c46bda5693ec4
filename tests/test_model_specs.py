"""``torchvision:NAME`` and ``timm:NAME`` model specs with ``--weights`` (safetensors or torch.save),
and the ImageNet-style resize-then-center-crop of folder images."""

import hashlib
import importlib.util
import json
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import advdetect
from advdetect.sources._robustbench_compat import import_torchvision
from advdetect.sources.datasets import DataOptions, load_data, sample_tensors
from advdetect.errors import UsageError
from advdetect.sources.models import ModelOptions, load_model
from advdetect.stages import preflight
from advdetect.stages.preflight import build_options, prepare

import_torchvision()  # torchvision (and timm, which imports it) need the workaround with a CPU build of torch
import timm  # noqa: E402
import torchvision  # noqa: E402

X = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
#: One FGSM cell: the audits below check that the specs run end to end, not the attacks.
ONE_CELL_SUITE = '[[attack]]\nname = "fgsm"\neps = [0.1]\n'


def randomized(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """``model`` in eval mode with every parameter and BatchNorm statistic drawn from ``seed``, so
    logits that match prove the weights were loaded, not just the architecture built."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                values = torch.rand(tensor.shape, generator=generator)
                tensor.copy_(values + 0.5 if name.endswith("running_var") else (values - 0.5) * 0.2)
    return model.eval()


@pytest.fixture
def resnet18_10(tmp_path):
    """A 10-class torchvision ResNet-18 and its weights as safetensors."""
    model = randomized(torchvision.models.resnet18(num_classes=10), seed=1)
    save_file(model.state_dict(), tmp_path / "resnet18.safetensors")
    return model, tmp_path / "resnet18.safetensors"


@pytest.fixture
def mobilenet_10(tmp_path):
    """A 10-class torchvision MobileNetV3-Small (cheaper to audit than a ResNet-18) as safetensors."""
    model = randomized(torchvision.models.mobilenet_v3_small(num_classes=10), seed=6)
    save_file(model.state_dict(), tmp_path / "mobilenet.safetensors")
    return model, tmp_path / "mobilenet.safetensors"


@pytest.fixture
def timm_7(tmp_path):
    """A 7-class timm test_byobnet (a tiny ByobNet) and its weights as safetensors."""
    model = randomized(timm.create_model("test_byobnet", pretrained=False, num_classes=7), seed=2)
    save_file(model.state_dict(), tmp_path / "byobnet.safetensors")
    return model, tmp_path / "byobnet.safetensors"


def test_torchvision_spec_builds_the_architecture_with_the_checkpoints_classes(resnet18_10):
    model, weights = resnet18_10
    loaded = load_model("torchvision:resnet18", ModelOptions(weights=str(weights)))
    with torch.no_grad():
        assert loaded.module(X).shape == (3, 10)
        assert torch.equal(loaded.module(X), model(X))
    assert not loaded.module.training
    assert loaded.info["architecture"] == {"library": "torchvision", "name": "resnet18", "classifier_outputs": 10,
                                           "classes_from_weights": True}
    assert loaded.info["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert loaded.info["options"]["weights"] == str(weights) and loaded.info["spec"] == "torchvision:resnet18"


def test_timm_spec_builds_the_architecture_with_the_checkpoints_classes(timm_7):
    model, weights = timm_7
    loaded = load_model("timm:test_byobnet", ModelOptions(weights=str(weights)))
    with torch.no_grad():
        assert loaded.module(X).shape == (3, 7)
        assert torch.equal(loaded.module(X), model(X))
    architecture = loaded.info["architecture"]
    assert architecture["library"] == "timm" and architecture["classifier_outputs"] == 7
    assert architecture["mean"] == [0.485, 0.456, 0.406]  # what the architecture's pretrained weights expect


def test_default_class_count_is_kept_when_the_checkpoint_has_it(tmp_path):
    model = randomized(timm.create_model("test_efficientnet", pretrained=False), seed=3)
    save_file(model.state_dict(), tmp_path / "w.safetensors")
    loaded = load_model("timm:test_efficientnet", ModelOptions(weights=str(tmp_path / "w.safetensors")))
    assert loaded.info["architecture"]["classifier_outputs"] == 1000
    assert not loaded.info["architecture"]["classes_from_weights"]
    with torch.no_grad():
        assert torch.equal(loaded.module(X), model(X))


def test_mean_and_std_wrap_a_torchvision_model(resnet18_10):
    model, weights = resnet18_10
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    loaded = load_model("torchvision:resnet18", ModelOptions(weights=str(weights), mean=mean, std=std))
    normalized = (X - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(X), model(normalized))
    assert loaded.info["name"] == "Normalized"


class NotATensor:
    """Pickled into a checkpoint, it is refused by torch.load(weights_only=True)."""


def test_pt_weights_are_read_with_weights_only_and_unwrapped(resnet18_10, tmp_path):
    model, _ = resnet18_10
    wrapped = {"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}  # DataParallel checkpoint
    torch.save(wrapped, tmp_path / "wrapped.pth")
    loaded = load_model("torchvision:resnet18", ModelOptions(weights=str(tmp_path / "wrapped.pth")))
    with torch.no_grad():
        assert torch.equal(loaded.module(X), model(X))
    torch.save({"state_dict": model.state_dict(), "extra": NotATensor()}, tmp_path / "pickled.pt")
    with pytest.raises(UsageError, match=r"cannot read weights .*pickled.pt: .*expected a state_dict") as error:
        load_model("torchvision:resnet18", ModelOptions(weights=str(tmp_path / "pickled.pt")))
    assert "\n" not in str(error.value)


def test_safetensors_weights_for_a_file_callable_spec(tmp_path):
    (tmp_path / "net.py").write_text(textwrap.dedent('''
        from torch import nn

        class Net(nn.Sequential):
            def __init__(self):
                super().__init__(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    '''))
    model = load_model(f"{tmp_path / 'net.py'}:Net").module
    randomized(model, seed=4)
    save_file(model.state_dict(), tmp_path / "net.safetensors")
    (tmp_path / "net.bin").write_bytes((tmp_path / "net.safetensors").read_bytes())  # known by its header too
    for name in ("net.safetensors", "net.bin"):
        loaded = load_model(f"{tmp_path / 'net.py'}:Net", ModelOptions(weights=str(tmp_path / name)))
        with torch.no_grad():
            assert torch.equal(loaded.module(X), model(X))


@pytest.mark.parametrize("spec", ["torchvision:resnet18", "timm:test_byobnet"])
def test_missing_weights_are_refused(spec):
    with pytest.raises(UsageError, match=r"needs --weights FILE .*never downloads weights") as error:
        load_model(spec)
    assert "\n" not in str(error.value)


def test_mismatched_shapes_name_the_key_and_both_shapes(resnet18_10, tmp_path):
    model, _ = resnet18_10
    state = dict(model.state_dict(), **{"conv1.weight": torch.zeros(64, 3, 3, 3)})  # a CIFAR-style 3x3 stem
    save_file(state, tmp_path / "cifar_stem.safetensors")
    with pytest.raises(UsageError, match=r"do not fit ResNet: 1 mis-shaped \(conv1.weight \(64, 3, 3, 3\) vs "
                                         r"\(64, 3, 7, 7\)\)$"):
        load_model("torchvision:resnet18", ModelOptions(weights=str(tmp_path / "cifar_stem.safetensors")))
    with pytest.raises(UsageError, match=r"do not fit ResNet: 96 missing"):  # resnet34 has more blocks
        load_model("torchvision:resnet34", ModelOptions(weights=str(tmp_path / "cifar_stem.safetensors")))


@pytest.mark.parametrize(("spec", "message"), [
    ("torchvision:resnet81", r"torchvision has no image classifier 'resnet81'; close names: resnet18"),
    ("torchvision:fasterrcnn_resnet50_fpn", r"'fasterrcnn_resnet50_fpn' is not an image classifier"),
    ("timm:test_byobnt", r"timm has no model 'test_byobnt'; close names: test_byobnet"),
    ("timm:hf-hub:timm/resnet18.a1_in1k", r"hf-hub: names need a download"),
    ("timm:", r"names no architecture"),
])
def test_unknown_names_list_close_ones(spec, message, resnet18_10):
    with pytest.raises(UsageError, match=message) as error:
        load_model(spec, ModelOptions(weights=str(resnet18_10[1])))
    assert "\n" not in str(error.value)


def test_missing_timm_says_how_to_install_it(monkeypatch, timm_7):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "timm" else find_spec(name, *a))
    with pytest.raises(UsageError, match=r'timm is not installed; install it with: pip install "advdetect\[timm\]"'):
        load_model("timm:test_byobnet", ModelOptions(weights=str(timm_7[1])))


@pytest.mark.slow
@pytest.mark.parametrize(("spec", "model_fixture", "extra"), [
    ("torchvision:mobilenet_v3_small", "mobilenet_10", {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}),
    ("timm:test_byobnet", "timm_7", {}),
])
def test_audit_of_a_spec_through_the_python_api(spec, model_fixture, extra, request, tmp_path):
    _, weights = request.getfixturevalue(model_fixture)
    loaded = load_model(spec, ModelOptions(weights=str(weights), **extra))
    x = torch.rand(28, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        logits = loaded.module(x)
    classes, y = logits.shape[1], logits.argmax(dim=1)  # labels the model gets right, so there is something to attack
    (tmp_path / "one.toml").write_text(ONE_CELL_SUITE)
    result = advdetect.audit(spec, (x, y), suite=str(tmp_path / "one.toml"), weights=str(weights), n=8,
                             n_reference=20, detectors=["msp"], out=tmp_path / "run", cache=False, **extra)
    assert len(result.attacks) == 1 and {row.detector for row in result.rows} == {"msp"}
    assert result.clean_accuracy == 1.0 and result.attacks[0].n_attacked == 8
    assert result.results_json.is_file()
    recorded = json.loads((tmp_path / "run" / "run.json").read_text())["model"]
    assert recorded["spec"] == spec and recorded["num_classes"] == classes
    assert recorded["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert recorded["architecture"]["classifier_outputs"] == classes


# --- folder images: shorter side resized, then center-cropped --------------------------------

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


@pytest.fixture
def wide_folder(tmp_path):
    """One 60x20 (width x height) image: red left quarter, green middle half, blue right quarter."""
    pixels = np.zeros((20, 60, 3), dtype=np.uint8)
    pixels[:, :15], pixels[:, 15:45], pixels[:, 45:] = RED, GREEN, BLUE
    (tmp_path / "data" / "stripes").mkdir(parents=True)
    Image.fromarray(pixels).save(tmp_path / "data" / "stripes" / "wide.png")
    Image.fromarray(pixels.transpose(1, 0, 2).copy()).save(tmp_path / "data" / "stripes" / "tall.png")
    return tmp_path / "data"


def pure(colour, side):
    return np.broadcast_to(np.array(colour, dtype=np.float32).reshape(3, 1, 1) / 255, (3, side, side))


@pytest.mark.parametrize(("options", "side"), [
    (DataOptions(image_size=10), 10),  # shorter side to 10 (30x10), center crop 10x10
    (DataOptions(image_size=12, crop=8), 8),  # shorter side to 12 (36x12), center crop 8x8
    (DataOptions(crop=7), 7),  # shorter side to round(7 / 0.875) = 8 (24x8), center crop 7x7
])
def test_folder_resizes_the_shorter_side_then_center_crops(wide_folder, options, side):
    sample = load_data(f"folder:{wide_folder}", options)
    assert sample.x.shape == (2, 3, side, side)
    for image in sample.x.numpy():  # only the green middle survives, of the wide and the tall image alike
        np.testing.assert_allclose(image, pure(GREEN, side), atol=1 / 255)
    assert sample.info["preprocessing"].startswith(f"shorter side resized to {options.image_size or 8},")


def test_folder_without_sizes_keeps_images_and_refuses_mixed_sizes(wide_folder):
    (wide_folder / "stripes" / "tall.png").unlink()
    x = load_data(f"folder:{wide_folder}").x
    assert x.shape == (1, 3, 20, 60) and x[0, :, 0, 0].tolist() == [1.0, 0.0, 0.0]  # red left edge kept
    Image.new("RGB", (7, 5)).save(wide_folder / "stripes" / "small.png")
    with pytest.raises(UsageError, match=r"different sizes .*pass --image-size or --crop"):
        load_data(f"folder:{wide_folder}")


def test_crop_errors(wide_folder, tmp_path):
    # the sizes are checked with the audit's options (advdetect/config/options.py), before any data is read
    with pytest.raises(UsageError, match=r"--crop 12 is larger than --image-size 10"):
        build_options(data=f"folder:{wide_folder}", image_size=10, crop=12)
    with pytest.raises(UsageError, match=r"--crop must be at least 1; got 0"):
        build_options(data=f"folder:{wide_folder}", crop=0)
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 8, 8, 3), dtype=np.uint8), y=np.arange(4))
    with pytest.raises(UsageError, match=r"--crop applies to folder:DIR images only"):
        load_data(f"npz:{tmp_path / 'd.npz'}", DataOptions(crop=4))
    with pytest.raises(UsageError, match=r"--crop applies to folder:DIR images only"):
        sample_tensors(torch.zeros(4, 3, 8, 8), torch.arange(4), DataOptions(crop=4))
    assert load_data(f"npz:{tmp_path / 'd.npz'}", DataOptions(image_size=5)).x.shape == (4, 3, 5, 5)


def test_crop_flows_from_the_options_to_the_data(wide_folder, monkeypatch):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(4, 2))
    seen = []

    def load_data_spy(spec, options):
        seen.append(options)
        raise UsageError("stop here")

    monkeypatch.setattr(preflight, "load_data", load_data_spy)
    with pytest.raises(UsageError, match="stop here"):
        prepare(build_options(model=model, data=f"folder:{wide_folder}", image_size=9, crop=7, detectors=["msp"],
                              cache=False))
    assert (seen[0].image_size, seen[0].crop) == (9, 7) and build_options().crop is None
    with pytest.raises(UsageError, match=r"--crop must be at least 1; got 0"):
        prepare(build_options(model=model, crop=0, detectors=["msp"], cache=False))
    assert len(seen) == 1
