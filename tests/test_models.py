import textwrap

import pytest
import torch

from advdetect.errors import UsageError
from advdetect.sources.models import ModelOptions, Normalized, ThreatModel, load_model

MODEL_SOURCE = textwrap.dedent('''
    import torch
    from torch import nn

    class TinyNet(nn.Module):
        def __init__(self, classes=3):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.head = nn.Linear(4, classes)

        def forward(self, x):
            return self.head(self.conv(x).mean(dim=(2, 3)))

    def make():
        return TinyNet()
''')
X = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "tinynet.py"
    path.write_text(MODEL_SOURCE)
    return path


@pytest.fixture
def trained(model_file, tmp_path):
    """A TinyNet from the file with weights of its own, saved as a state_dict."""
    torch.manual_seed(3)
    model = load_model(f"{model_file}:TinyNet").module
    for p in model.parameters():
        torch.nn.init.normal_(p)
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    return model


def test_file_callable_with_weights(model_file, trained, tmp_path):
    loaded = load_model(f"{model_file}:TinyNet", ModelOptions(weights=str(tmp_path / "weights.pt")))
    assert torch.equal(loaded.module(X), trained(X))
    assert loaded.info["name"] == "TinyNet" and loaded.info["input_channels"] == 3
    assert loaded.info["num_parameter_tensors"] == 4
    wrapped = {"state_dict": {f"module.{k}": v for k, v in trained.state_dict().items()}}  # DataParallel checkpoint
    torch.save(wrapped, tmp_path / "wrapped.pt")
    unwrapped = load_model(f"{model_file}:make", ModelOptions(weights=str(tmp_path / "wrapped.pt")))
    assert torch.equal(unwrapped.module(X), trained(X))


def test_package_module_callable(model_file, monkeypatch):
    monkeypatch.syspath_prepend(str(model_file.parent))
    loaded = load_model("tinynet:make")
    assert loaded.module(X).shape == (2, 3) and not loaded.module.training


def test_weights_that_do_not_fit_list_a_few_keys(model_file, tmp_path):
    torch.save({"conv.weight": torch.zeros(4, 3, 3, 3), "extra.bias": torch.zeros(1), "head.weight": torch.zeros(2, 4)},
               tmp_path / "bad.pt")
    with pytest.raises(UsageError, match=r"do not fit TinyNet: 2 missing \(conv.bias, head.bias\); 1 unexpected "
                                         r"\(extra.bias\); 1 mis-shaped \(head.weight \(2, 4\) vs \(3, 4\)\)"):
        load_model(f"{model_file}:TinyNet", ModelOptions(weights=str(tmp_path / "bad.pt")))


def test_corrupt_or_missing_files_are_clear_errors(model_file, tmp_path):
    (tmp_path / "corrupt.pt").write_bytes(b"\x80\x02garbage")
    with pytest.raises(UsageError, match=r"cannot read weights .*corrupt.pt: .*expected a state_dict"):
        load_model(f"{model_file}:TinyNet", ModelOptions(weights=str(tmp_path / "corrupt.pt")))
    with pytest.raises(UsageError, match=r"weights file .*nope.pt' not found"):
        load_model(f"{model_file}:TinyNet", ModelOptions(weights=str(tmp_path / "nope.pt")))
    with pytest.raises(UsageError, match=r"has no 'Missing'; callables in it: .*TinyNet"):
        load_model(f"{model_file}:Missing")
    with pytest.raises(UsageError, match=r"model file 'nope.py' not found"):
        load_model("nope.py:Net")
    (tmp_path / "broken.py").write_text("import not_a_module_anywhere\n")
    with pytest.raises(UsageError, match=r"cannot import model file .*broken.py: ModuleNotFoundError"):
        load_model(f"{tmp_path / 'broken.py'}:Net")
    with pytest.raises(UsageError, match="model spec 'resnet' not understood"):
        load_model("resnet")


def test_torchscript_archive(trained, tmp_path):
    torch.jit.script(trained).save(str(tmp_path / "scripted.pt"))
    loaded = load_model(str(tmp_path / "scripted.pt"))
    assert torch.equal(loaded.module(X), trained(X)) and loaded.info["input_channels"] == 3
    with pytest.raises(UsageError, match=r"weights.pt is not a TorchScript archive .*--model file.py:Class --weights"):
        load_model(str(tmp_path / "weights.pt"))


def test_mean_and_std_wrap_a_model_that_expects_normalized_inputs(model_file, trained, tmp_path):
    options = ModelOptions(weights=str(tmp_path / "weights.pt"), mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.25))
    loaded = load_model(f"{model_file}:TinyNet", options)
    assert isinstance(loaded.module, Normalized)
    mean, std = torch.tensor(options.mean).view(1, 3, 1, 1), torch.tensor(options.std).view(1, 3, 1, 1)
    torch.testing.assert_close(loaded.module(X), trained((X - mean) / std))
    with pytest.raises(UsageError, match="give --mean and --std together"):
        load_model(f"{model_file}:TinyNet", ModelOptions(mean=(0.5,)))
    with pytest.raises(UsageError, match="--mean has 2 values but the model takes 3 channels"):
        load_model(f"{model_file}:TinyNet", ModelOptions(mean=(0.5, 0.5), std=(1.0, 1.0)))


# --- robustbench, offline, with a checkpoint planted where its model zoo looks -------------

ROBUSTBENCH_NAME = "Ding2020MMA"  # a WideResNet-28-4, the smallest CIFAR-10 Linf architecture of the zoo


@pytest.fixture
def zoo_model():
    from advdetect.sources._robustbench_compat import robustbench_utils

    robustbench_utils()
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel as RBThreatModel

    torch.manual_seed(0)
    return model_dicts[BenchmarkDataset.cifar_10][RBThreatModel.Linf][ROBUSTBENCH_NAME]["model"]().eval()


def test_robustbench_loads_offline_from_a_planted_checkpoint(zoo_model, tmp_path):
    path = tmp_path / "cifar10" / "Linf" / f"{ROBUSTBENCH_NAME}.pt"
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": zoo_model.state_dict()}, path)
    loaded = load_model(f"robustbench:{ROBUSTBENCH_NAME}", ModelOptions(model_dir=str(tmp_path)))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x), zoo_model(x))
    assert loaded.info["input_channels"] == 3 and not loaded.module.training


def test_robustbench_poisoned_cache_names_the_file_to_delete(zoo_model, tmp_path):
    path = tmp_path / "cifar10" / "Linf" / f"{ROBUSTBENCH_NAME}.pt"
    path.parent.mkdir(parents=True)
    path.write_text("<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title></head></html>")
    with pytest.raises(UsageError,
                       match=rf"{path} is an HTML page saved by a failed download, not a checkpoint; delete it"):
        load_model(f"robustbench:{ROBUSTBENCH_NAME}", ModelOptions(model_dir=str(tmp_path)))


def test_robustbench_missing_checkpoint_names_where_to_put_it(zoo_model, tmp_path, monkeypatch):
    import robustbench.utils

    def failed_download(gdrive_id, path):
        path.write_bytes(b"<html>partial")  # what a failed download leaves behind
        raise ConnectionError("no network")

    monkeypatch.setattr(robustbench.utils, "download_gdrive_new", failed_download)
    path = tmp_path / "cifar10" / "L2" / f"{ROBUSTBENCH_NAME}.pt"
    with pytest.raises(UsageError, match=rf"not at {path} and downloading it failed \(ConnectionError: no network\); "
                                         r"place the checkpoint at that path"):
        load_model(f"robustbench:{ROBUSTBENCH_NAME}",
                   ModelOptions(model_dir=str(tmp_path), threat_model=ThreatModel.L2))
    assert not path.exists()
    with pytest.raises(UsageError, match="robustbench has no model 'Nope2099' for cifar10/Linf"):
        load_model("robustbench:Nope2099", ModelOptions(model_dir=str(tmp_path)))
