"""Detectors standalone, in the pytorch-ood style: bound to a model, fitted on tensors, a Dataset or a
DataLoader, they score inputs as the same detectors do in an audit (one path: prepare, signatures,
fit_signatures, score_samples)."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

import advdetect
from advdetect.detectors import DETECTORS
from advdetect.run.folder import cell_arrays, read_attack_records, read_run, reference_arrays, sample_arrays
from advdetect.run.splits import fit_rounds
from advdetect.run.storage import load_arrays
from advdetect.sources import embedded
from advdetect.stages.detect import unseen_source
from helpers import shuffled_digits

#: Two cells, so that supervised detectors also fit on one cell and score the other (``unseen``).
SUITE = """
[[attack]]
name = "fgsm"
eps = [0.3]

[[attack]]
name = "pgd"
eps = [0.3]
alpha = 0.1
steps = 3
"""
STANDALONE = {"msp": advdetect.MaxSoftmax, "mahalanobis": advdetect.Mahalanobis,
              "confounding_gradient": advdetect.ConfoundingGradient}


class Digits(Dataset):
    """Items as many datasets give them: a numpy image and a Python int label."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x.numpy(), y.tolist()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return self.x[i], self.y[i]


@pytest.fixture(scope="module")
def model():
    return embedded.default_model()


@pytest.fixture(scope="module")
def digits():
    return shuffled_digits(60)


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    root = tmp_path_factory.mktemp("standalone")
    (root / "suite.toml").write_text(SUITE)
    advdetect.audit("default", "default", suite=str(root / "suite.toml"), n=60, n_reference=60,
                    detectors=list(STANDALONE), out=root / "run", cache=False)
    return root / "run"


def audit_inputs(run_dir):
    """What the audit's detect stage read, from its run folder: the correctly classified inputs, the
    reference inputs and, per cell, its adversarial inputs and its calibration and test rows."""
    info = read_run(run_dir)
    sample = sample_arrays(run_dir)
    correct = np.flatnonzero(sample["pred"] == sample["y"])
    clean = torch.from_numpy(sample["x"][correct])
    reference = reference_arrays(run_dir, clean.shape[1:])
    [(fit, test)] = fit_rounds(info, len(correct))
    records = read_attack_records(run_dir, info)
    cells = {}
    for record in records:
        arrays = cell_arrays(run_dir, record, len(correct), clean.shape[1:])
        cells[record.key] = (record, torch.from_numpy(arrays["x_adv"]), np.flatnonzero(arrays["fooled"] & fit),
                             np.flatnonzero(arrays["fooled"] & test))
    return info, clean, (torch.from_numpy(reference["x"]), torch.from_numpy(reference["y"])), records, cells


def as_tensors(*tensors):
    return tensors[0] if len(tensors) == 1 else tensors


def as_loader(*tensors):
    return DataLoader(TensorDataset(*tensors), batch_size=16)


@pytest.mark.slow
@pytest.mark.parametrize("form", [as_tensors, as_loader], ids=["tensors", "dataloader"])
@pytest.mark.parametrize("name", list(STANDALONE))
def test_a_standalone_detector_scores_as_in_the_audit(audited, model, name, form):
    """On tensors under every protocol of every cell; on DataLoaders (clean, adversarial and reference
    inputs alike) under ``seen`` on the last cell, which is the same path once the inputs are read."""
    info, clean, reference, records, cells = audit_inputs(audited)
    source = unseen_source(records)
    compared = 0
    for record, x_adv, _, test in cells.values():
        scores = load_arrays(audited / "scores" / f"{record.slug}.npz")
        for protocol in ("seen", "unseen", "oneclass"):
            if f"{protocol}__{name}__clean" not in scores or (form is as_loader and (
                    protocol != "seen" or record is not records[-1])):
                continue
            detector = STANDALONE[name](model)
            if detector.uses_adversarial and protocol != "oneclass":  # fitted on calibration pairs
                _, fit_adv, fit, _ = cells[source.key] if protocol == "unseen" else cells[record.key]
                fitted = detector.fit(form(clean[fit]), form(fit_adv[fit]), reference=form(*reference),
                                      batch_size=info.batch_size)
            else:  # fitted on the reference inputs
                fitted = detector.fit(form(*reference), batch_size=info.batch_size)
            assert fitted is detector
            # equal but for the last bits of float32 signatures, which depend on the other rows of a batch
            np.testing.assert_allclose(detector(form(clean[test]), batch_size=info.batch_size),
                                       scores[f"{protocol}__{name}__clean"], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(detector.predict(form(x_adv[test]), batch_size=info.batch_size),
                                       scores[f"{protocol}__{name}__adversarial"], rtol=1e-5, atol=1e-6)
            compared += 1
    # two cells, the first the unseen protocol's source: every protocol the detector runs under
    assert compared == (1 if form is as_loader else {"msp": 4, "mahalanobis": 5, "confounding_gradient": 3}[name])


@pytest.mark.slow
def test_fitting_on_a_dataset_equals_fitting_on_tensors(model, digits):
    x, y = digits
    on_tensors = advdetect.Mahalanobis(model, noises=(0.002,)).fit((x[:40], y[:40]))
    on_dataset = advdetect.Mahalanobis(model, noises=(0.002,)).fit(Digits(x[:40], y[:40]))
    for a, b in zip(on_tensors.means_ + on_tensors.precisions_, on_dataset.means_ + on_dataset.precisions_):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    expected = on_tensors(x[40:])
    np.testing.assert_array_equal(on_dataset(Digits(x[40:], y[40:])), expected)
    # the labels reach prepare: fitted with other labels, the class Gaussians and the scores move
    relabelled = advdetect.Mahalanobis(model, noises=(0.002,)).fit(Digits(x[:40], y[:40].roll(1)))
    assert not np.allclose(relabelled(x[40:]), expected)


@pytest.mark.slow
def test_a_supervised_detector_fits_on_datasets_as_on_tensors(model, digits):
    x, y = digits
    moved = (x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0)).sign()).clamp(0, 1)
    on_tensors = advdetect.ConfoundingGradient(model, Cs=(0.1, 1.0), cv=3).fit((x[:30], y[:30]), moved[:30])
    on_dataset = advdetect.ConfoundingGradient(model, Cs=(0.1, 1.0), cv=3).fit(Digits(x[:30], y[:30]),
                                                                                TensorDataset(moved[:30]))
    assert on_dataset.fitted_params() == on_tensors.fitted_params()
    np.testing.assert_array_equal(on_dataset(TensorDataset(x[30:])), on_tensors(x[30:]))
    assert on_tensors(moved[30:]).mean() > on_tensors(x[30:]).mean()  # it learned which is which


def test_every_registered_detector_is_exported_under_its_class_name_and_binds_a_model(model):
    for cls in DETECTORS.values():
        assert getattr(advdetect, cls.__name__) is cls and cls.__name__ in advdetect.__all__
        detector = cls(model)
        assert detector.model is model and "model" not in detector.get_params()  # a suite cannot set it


@pytest.mark.slow
def test_the_model_is_bound_not_a_hyperparameter(model, digits):
    x, y = digits
    detector = advdetect.Mahalanobis(model, noises=(0.0,))
    assert detector.model is model and "model" not in detector.get_params() and "model" not in repr(detector)
    assert detector.get_params()["noises"] == (0.0,)
    expected = detector.fit((x[:40], y[:40]))(x[40:])
    model.train()
    try:
        with torch.no_grad():  # as in an evaluation loop: the detector still reads its gradients, in eval mode
            np.testing.assert_array_equal(detector(x[40:]), expected)
        assert model.training  # the model's mode is left as it was
    finally:
        model.eval()


def test_standalone_misuse_fails_with_a_clear_message(model, digits):
    x, y = digits
    with pytest.raises(ValueError, match=r"needs a model: create the detector as MaxSoftmax\(model, ...\)"):
        advdetect.MaxSoftmax()(x)
    with pytest.raises(ValueError,
                       match="confounding_gradient is supervised: fit it with clean and adversarial inputs"):
        advdetect.ConfoundingGradient(model).fit((x, y))
    with pytest.raises(ValueError, match=r"to give labels, pass clean as an \(x, y\) pair"):
        advdetect.Mahalanobis(model).fit(x, y)  # scikit-learn's habit: here the second argument is adversarial
    with pytest.raises(ValueError, match="labelled inputs"):
        advdetect.Mahalanobis(model).fit(x)
    with pytest.raises(ValueError, match="shuffle=False"):
        advdetect.MaxSoftmax(model)(DataLoader(TensorDataset(x), shuffle=True))
    with pytest.raises(TypeError, match="inputs must be"):
        advdetect.MaxSoftmax(model)([x, x, x])
