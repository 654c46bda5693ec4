"""Edge cases at the boundaries of an audit: a model that classifies none or one of the audited
inputs correctly, numeric options given through the Python API, and checkpoints that lack
BatchNorm batch counts."""

import base64
import io
import math
import textwrap

import numpy as np
import pytest
import torch
from helpers import TINY_SUITE
from torch import nn

import advdetect
from advdetect.report import document as report, pdf as report_pdf
from advdetect.stages.attack import adversarial_predictions
from advdetect.sources.datasets import stratified_indices
from advdetect.errors import UsageError
from advdetect.signatures.inference import batched_logits
from advdetect.sources.models import ModelOptions, load_model
from advdetect.config.options import OPTIONS_BY_NAME, InvalidValue
from advdetect.stages.preflight import build_options, prepare
from advdetect.config.suite import load_suite

N, N_DATA, N_REFERENCE = 10, 60, 30


class Pixels(nn.Module):
    """A linear model of the centred pixels: unlike a tiny random CNN, it gives every class to some
    random images."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head((x - 0.5).flatten(1))


def tiny_model() -> Pixels:
    torch.manual_seed(0)
    return Pixels().eval()


def data_with_correct(model: nn.Module, correct: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and labels of which exactly ``correct`` of the ``N`` audited inputs (seed 0) are
    classified correctly by ``model``: every label is one the model does not give, then audited
    images are swapped for ones the model gives their label (labels untouched, so the sample is too)."""
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(N_DATA, 1, 8, 8, generator=generator)
    with torch.no_grad():
        y = (model(x).argmax(dim=1) + 1) % 3
        audited = stratified_indices(y.numpy(), N, 0)
        pool = torch.rand(2000, 1, 8, 8, generator=generator)
        pool_pred = model(pool).argmax(dim=1)
    for k in audited[:correct]:
        x[k] = pool[int(torch.nonzero(pool_pred == y[k])[0])]
    return x, y


def run_audit(tmp_path, x, y, suite_text=TINY_SUITE, **extra):
    (tmp_path / "tiny.toml").write_text(suite_text)
    return advdetect.audit(tiny_model(), (x, y), suite=str(tmp_path / "tiny.toml"), n=N, n_reference=N_REFERENCE,
                           detectors=["msp"], out=tmp_path / "run", cache=False, **extra)


# --- a model that classifies none of the audited inputs correctly --------------------------------


def test_empty_inputs_give_logits_of_no_rows_and_every_class(tiny_model_and_cell):
    model, cell = tiny_model_and_cell
    assert batched_logits(model, torch.zeros(0, 1, 8, 8), 4, num_classes=3).shape == (0, 3)
    assert batched_logits(model, torch.zeros(0, 1, 8, 8), 4).shape == (0, 3)  # as the model answers no inputs
    predictions = adversarial_predictions(model, cell, torch.zeros(0, 1, 8, 8), 4, 3)
    assert predictions.shape == (0,) and predictions.dtype == torch.int64


@pytest.fixture
def tiny_model_and_cell():
    return tiny_model(), load_suite("default").cells()[0]


@pytest.mark.slow
def test_a_model_that_classifies_no_audited_input_correctly_is_refused_before_any_work(tmp_path):
    """Nothing can be attacked or detected: an audit that finished would show only empty cells, and
    its threshold checks would all be skipped, a verdict that passes. The user is told why instead."""
    x, y = data_with_correct(tiny_model(), 0)
    suite = TINY_SUITE + "\n[thresholds]\nmax_attack_success_rate = 0.5\n"
    with pytest.raises(UsageError, match=r"^the model classifies none of the 10 audited inputs correctly, .*nothing "
                                         r"to audit; check that the labels follow the model's class order") as info:
        run_audit(tmp_path, x, y, suite_text=suite)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "run").exists()


# --- a model that classifies one audited input correctly: report.pdf ----------------------------


@pytest.mark.slow
def test_one_correctly_classified_input_gives_a_pdf_report(tmp_path):
    """The thumbnail strip of a single input is taller than a page: scaled down, not a LayoutError."""
    result = run_audit(tmp_path, *data_with_correct(tiny_model(), 1))
    assert round(result.clean_accuracy * N) == 1
    assert all(record.n_attacked == 1 for record in result.attacks)
    assert result.report_pdf.read_bytes().startswith(b"%PDF") and result.report_html.is_file()


@pytest.mark.slow
def test_captions_longer_than_a_page_split_over_pages(tmp_path, monkeypatch):
    """A figure whose captions (very many detectors) leave no room on its page: the row runs over
    pages instead of stopping the report."""
    result = run_audit(tmp_path, *data_with_correct(tiny_model(), 1))
    write_pdf = report.write_pdf

    def with_long_captions(path, view):
        for section in view["sections"]:
            section["figures"].append({"anchor": "x", "alt": "x", "png": section["comparison"],
                                       "captions": [f"detector{i}: a caption long enough to wrap over two lines "
                                                    f"of its column" for i in range(80)]})
        write_pdf(path, view)

    monkeypatch.setattr(report, "write_pdf", with_long_captions)
    (result.run_dir / "report.pdf").unlink()
    report.write_report(result.run_dir)
    assert (result.run_dir / "report.pdf").read_bytes().startswith(b"%PDF")


def png_base64(width_inches: float, height_inches: float) -> str:
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(width_inches, height_inches))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=40)
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize("size", [(1.25, 4.0), (30.0, 2.0), (1.0, 50.0), (4.2, 4.4)])
def test_every_pdf_figure_fits_the_frame_with_its_aspect_ratio(size):
    image = report_pdf._image(png_base64(*size), 229.0)
    assert image.drawWidth <= min(229.0, report_pdf.FRAME_WIDTH) + 1e-6
    assert image.drawHeight <= report_pdf.FRAME_HEIGHT + 1e-6
    assert math.isclose(image.drawWidth / image.drawHeight, size[0] / size[1], rel_tol=0.02)
    small = report_pdf._image(png_base64(*size), 229.0, 100.0)
    assert small.drawWidth <= 229.0 + 1e-6 and small.drawHeight <= 100.0 + 1e-6


# --- numeric options through the Python API -----------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("image_size", 0, "--image-size must be at least 1; got 0"),
        ("image_size", -3, "--image-size must be at least 1; got -3"),
        ("image_size", 2.5, "--image-size must be a whole number; got 2.5"),
        ("crop", 0, "--crop must be at least 1; got 0"),
        ("n", 0, "--n must be at least 1; got 0"),
        ("n", 2.5, "--n must be a whole number; got 2.5"),
        ("n_reference", 0, "--n-reference must be at least 20; got 0"),
        ("n_reference", 25.5, "--n-reference must be a whole number; got 25.5"),
        ("batch_size", 0, "--batch-size must be at least 1; got 0"),
        ("batch_size", 1.5, "--batch-size must be a whole number; got 1.5"),
        ("seed", -1, "--seed must be a whole number from 0 to 4294967295; got -1"),
        ("seed", 2**32, "--seed must be a whole number from 0 to 4294967295; got 4294967296"),
        ("seed", 0.5, "--seed must be a whole number; got 0.5"),
        ("fit_fraction", 0, "--fit-fraction must lie strictly between 0 and 1; got 0"),
        ("fit_fraction", 1.5, "--fit-fraction must lie strictly between 0 and 1; got 1.5"),
        ("fit_fraction", float("nan"), "--fit-fraction must lie strictly between 0 and 1; got nan"),
        ("fit_fraction", float("inf"), "--fit-fraction must lie strictly between 0 and 1; got inf"),
    ],
)
def test_numbers_the_command_line_refuses_are_refused_through_the_api(name, value, message, tmp_path):
    """The same rule as the flag's parser, in one line, before any work (no run folder)."""
    if name != "n_reference":  # its parser takes any whole number from 1; the audit needs 20
        with pytest.raises(InvalidValue):
            OPTIONS_BY_NAME[name].parse(str(value))
    x, y = data_with_correct(tiny_model(), 3)
    values = {"n": N, "n_reference": N_REFERENCE, name: value}
    with pytest.raises(UsageError, match=f"^{message}$".replace("+", r"\+")):
        advdetect.audit(tiny_model(), (x, y), suite="default", detectors=["msp"], out=tmp_path / "run", cache=False,
                        **values)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("n", "5", "--n must be a whole number; got '5'"),
        ("n", True, "--n must be a whole number; got True"),
        ("image_size", "8", "--image-size must be a whole number; got '8'"),
        ("batch_size", None, "--batch-size must be a whole number; got None"),
        ("fit_fraction", "0.2", "--fit-fraction must be a number; got '0.2'"),
        ("fit_fraction", True, "--fit-fraction must be a number; got True"),
    ],
)
def test_numbers_of_another_type_are_refused_by_prepare(name, value, message):
    with pytest.raises(UsageError, match=f"^{message}$"):
        prepare(build_options(model=tiny_model(), detectors=["msp"], cache=False, **{name: value}))


@pytest.mark.slow
def test_whole_numbers_of_numpy_are_taken(tmp_path):
    x, y = data_with_correct(tiny_model(), 3)
    result = advdetect.audit(tiny_model(), (x, y), suite="default", attacks=["fgsm"], detectors=["msp"],
                             out=tmp_path / "run", cache=False, n=np.int64(N), n_reference=np.int64(N_REFERENCE),
                             seed=np.int64(0), batch_size=np.int32(4), fit_fraction=np.float64(0.2))
    assert result.report_pdf.is_file()


# --- checkpoints without BatchNorm batch counts --------------------------------------------------


BN_MODEL = textwrap.dedent('''
    import torch
    from torch import nn

    class BNNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            return self.head(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))
''')
X = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def bn_checkpoint(tmp_path):
    """A BNNet spec with weights of its own (running statistics too) and its state_dict."""
    (tmp_path / "bnnet.py").write_text(BN_MODEL)
    spec = f"{tmp_path / 'bnnet.py'}:BNNet"
    torch.manual_seed(3)
    model = load_model(spec).module
    with torch.no_grad():
        for tensor in [*model.parameters(), model.bn.running_mean]:
            tensor.normal_()
        model.bn.running_var.uniform_(0.5, 2.0)
        model.bn.num_batches_tracked.fill_(7)
    return spec, model, model.state_dict()


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_a_checkpoint_without_batch_counts_loads(bn_checkpoint, tmp_path, suffix):
    spec, trained, state = bn_checkpoint
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pt":
        torch.save(state, path)
    else:
        from safetensors.torch import save_file

        save_file(state, str(path))
    loaded = load_model(spec, ModelOptions(weights=str(path))).module
    assert torch.equal(loaded(X), trained(X))
    assert int(loaded.bn.num_batches_tracked) == 0  # the module's own value


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s.pop("bn.running_mean"), r"1 missing \(bn.running_mean\)"),
        (lambda s: [s.pop(k) for k in list(s) if k.startswith("bn.")],  # a whole layer, its batch count too
         r"5 missing \(bn.weight, bn.bias, bn.running_mean, ...\)"),
        (lambda s: s.update({"bn.num_batches_tracked_extra": torch.tensor(1)}),
         r"1 unexpected \(bn.num_batches_tracked_extra\)"),
        (lambda s: s.update({"other.num_batches_tracked": torch.tensor(1)}),
         r"1 unexpected \(other.num_batches_tracked\)"),
        (lambda s: s.update({"bn.num_batches_tracked": torch.zeros(2, dtype=torch.long)}),
         r"1 mis-shaped \(bn.num_batches_tracked \(2,\) vs \(\)\)"),
    ],
)
def test_any_other_key_that_does_not_fit_is_still_refused(bn_checkpoint, tmp_path, change, message):
    spec, _, state = bn_checkpoint
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    change(state)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(UsageError, match=f"do not fit BNNet: {message}$"):
        load_model(spec, ModelOptions(weights=str(tmp_path / "bad.pt")))
