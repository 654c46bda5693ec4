"""The detector interface: signatures from a model, then an estimator on those signatures.

Bound to a model, a detector also works on its own, in the style of pytorch-ood::

    detector = Mahalanobis(model).fit(clean_loader)            # or (x, y) tensors, or a Dataset
    scores = detector(x)                                       # higher: more likely adversarial
    ConfoundingGradient(model).fit((x, y), adversarial=x_adv)  # supervised detectors see both

These entry points are thin wrappers over the calls an audit's detect stage makes (:meth:`Detector.prepare`,
:meth:`Detector.signatures`, :meth:`Detector.fit_signatures`, :meth:`Detector.score_samples`), so a detector
fitted on the same inputs scores as it does in an audit.
"""

from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
import sklearn
from scipy.stats import rankdata
from sklearn.base import BaseEstimator
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, SubsetRandomSampler, WeightedRandomSampler

from advdetect.signatures.activations import PlainForward

if TYPE_CHECKING:
    from typing_extensions import Self

#: Computes one block of signatures: ``(model, inputs, *, batch_size) -> [N, D]``.
SignatureFunction = Callable[..., np.ndarray]

#: Inputs as a standalone detector takes them: a tensor of inputs [N, ...], an ``(x, y)`` pair of
#: tensors, a ``Dataset`` of ``x`` or ``(x, y)`` items, or a ``DataLoader`` of such batches.
Inputs = torch.Tensor | tuple[torch.Tensor, torch.Tensor] | Dataset | DataLoader

#: Inverse regularization strengths the supervised detectors choose from by cross-validation.
DEFAULT_CS: tuple[float, ...] = tuple(float(c) for c in 10.0 ** np.arange(-3, 4))


class Bounds:
    """The numbers a hyperparameter (or each item of a list hyperparameter) may take:
    ``least <= value`` (``least < value`` when ``open_least``) and ``value < below``."""

    def __init__(self, least: float, *, open_least: bool = False, below: float = math.inf) -> None:
        self.least, self.open_least, self.below = least, open_least, below

    def admits(self, value: float) -> bool:
        return (value > self.least if self.open_least else value >= self.least) and value < self.below

    def __repr__(self) -> str:
        return f"Bounds({self.least!r}, open_least={self.open_least!r}, below={self.below!r})"


#: A whole-number hyperparameter's bounds unless its class declares others: a count, at least 1.
COUNT = Bounds(1)
#: A real hyperparameter's bounds unless its class declares others: positive.
POSITIVE = Bounds(0, open_least=True)
#: Bounds a class declares for hyperparameters that may be 0 (noise magnitudes, seeds).
NON_NEGATIVE = Bounds(0)


class Detector(BaseEstimator, ABC):
    """Scores inputs; higher means more likely adversarial (or out-of-distribution).

    Three steps, so that a signature is computed once per input and reused across fits:

    1. :meth:`prepare` fits whatever lives in the model's own space on clean reference inputs
       (class-conditional Gaussians, kernel densities, neighbour pools); most detectors need none.
    2. :meth:`signatures` maps inputs through the model to per-input arrays, shape [N, D].
    3. :meth:`fit_signatures` / :meth:`score_samples` work on those arrays alone, like a scikit-learn
       estimator: ``fit_signatures(clean)`` with clean signatures only, ``fit_signatures(clean,
       adversarial)`` with both.

    Hyperparameters are public constructor arguments (``get_params``); fitted state ends in ``_``.

    A detector bound to a model (its first constructor argument, ``Mahalanobis(model)``) also fits
    on inputs and scores inputs (:meth:`fit`, :meth:`predict`, or calling it), through the same
    three steps. The model is not a hyperparameter: ``get_params`` leaves it out, so a suite cannot
    set it and a clone is unbound.
    """

    name: ClassVar[str]
    #: :meth:`fit` cannot work without adversarial examples (a supervised detector).
    needs_adversarial: ClassVar[bool] = False
    #: :meth:`fit` uses adversarial examples when it gets them (to tune or to combine features),
    #: so the result depends on which attack it saw: the ``unseen`` protocol applies.
    uses_adversarial: ClassVar[bool] = False
    #: :meth:`fit_signatures` on clean signatures alone learns from them. False where such a fit
    #: learns nothing (fixed scores, a setting fixed in advance, a fit made in :meth:`prepare`): an
    #: audit then computes no signatures for it and passes an empty array.
    learns_from_clean: ClassVar[bool] = True
    #: :meth:`signatures` reads one plain forward pass (no gradients) and nothing else: the logits
    #: and the penultimate features. :meth:`forward_signatures` computes them from that pass, which
    #: an audit then makes once for all such detectors.
    plain_forward_only: ClassVar[bool] = False
    #: The numeric hyperparameters whose bounds differ from a count's (at least 1) or a real
    #: number's (positive); suites are checked against them before any work.
    bounds: ClassVar[dict[str, Bounds]] = {"cv": Bounds(2)}

    def __init__(self, model: nn.Module | None = None) -> None:
        self.model = model

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "fit" in vars(cls):  # an audit would never call it
            raise TypeError(f"{cls.__name__} overrides fit: a detector implements fit_signatures (the fit on "
                            f"signatures, which audits call); fit is the entry point on inputs")

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The hyperparameters: the constructor arguments but the model."""
        params = super().get_params(deep)
        params.pop("model", None)
        return params

    def validate(self) -> None:
        """Raise ValueError on a bad hyperparameter, before any work."""

    def check_model(self, model: nn.Module) -> None:
        """Raise ValueError when a hyperparameter cannot apply to ``model`` (checked before an audit's work)."""

    def inputs_at_once(self, batch_size: int) -> int:
        """The most inputs one forward pass of :meth:`signatures` holds at ``batch_size``, so an
        audit can refuse settings that cannot fit in memory before any work."""
        return batch_size

    def prepare(self, model: nn.Module, reference: torch.Tensor, labels: torch.Tensor, *,
                batch_size: int = 64) -> Detector:
        """Fit model-space state on clean reference inputs with their labels."""
        return self

    @abstractmethod
    def signatures(self, model: nn.Module, inputs: torch.Tensor, *, batch_size: int = 64) -> np.ndarray:
        """Per-input signatures, shape [N, D], of an eval-mode model taking inputs in [0, 1]."""

    def forward_signatures(self, model: nn.Module, forward: PlainForward) -> np.ndarray:
        """:meth:`signatures` of the inputs of ``forward``, a plain forward pass over them
        (:func:`~advdetect.signatures.activations.plain_forward` at the same batch size), for a
        detector that is :attr:`plain_forward_only`."""
        raise NotImplementedError(f"{self.name} reads more than one plain forward pass")

    def signature_key(self) -> tuple:
        """Detectors with equal keys compute equal signatures, so an audit computes them once."""
        return (type(self).__name__, id(self))

    def signature_blocks(self) -> list[tuple[tuple, SignatureFunction]]:
        """The signature as column blocks side by side, each a (key, function) pair with the
        arguments of :meth:`signatures`: detectors whose signatures differ but share a block (a
        variant that adds columns to another's) compute that block once in an audit. By default
        one block, the whole signature."""
        return [(self.signature_key(), self.signatures)]

    def fit_signatures(self, clean: np.ndarray, adversarial: np.ndarray | None = None) -> Detector:
        """Fit on signatures of clean and (optionally) adversarial inputs. When both have the same
        length, rows with the same index are a (clean, adversarial) pair of one source input."""
        return self

    def fit(self, clean: Inputs | np.ndarray, adversarial: Inputs | np.ndarray | None = None, *,
            reference: Inputs | None = None, batch_size: int = 64) -> Self:
        """Fit on inputs, as an audit's detect stage does: :meth:`prepare` on ``reference`` (labelled
        inputs; by default ``clean``), then :meth:`fit_signatures` on the :meth:`signatures` of
        ``clean`` and ``adversarial``, in batches of ``batch_size``. The detector must be bound to a
        model; returns it.

        ``clean`` and ``adversarial`` are any of :data:`Inputs` (the labels of adversarial inputs are
        ignored); when both have the same length, rows with the same index are a (clean, adversarial)
        pair. Only detectors that use adversarial examples (``uses_adversarial``) read
        ``adversarial``, and those that need them (``needs_adversarial``) require it.

        On numpy arrays (signatures, as :meth:`signatures` returns them) this is :meth:`fit_signatures`."""
        if isinstance(clean, np.ndarray):
            if adversarial is not None and not isinstance(adversarial, np.ndarray):
                raise TypeError("fit takes signatures (numpy arrays) or inputs (tensors, a Dataset or a DataLoader), "
                                "not one of each")
            return self.fit_signatures(clean, adversarial)  # type: ignore[return-value]
        model = self._bound_model("fit")
        if self.needs_adversarial and adversarial is None:
            raise ValueError(f"{self.name} is supervised: fit it with clean and adversarial inputs")
        paired = adversarial is not None and self.uses_adversarial
        x, y = as_tensors(clean, batch_size=batch_size, ordered=paired)
        x_adv = None
        if paired:
            x_adv, _ = as_tensors(adversarial, batch_size=batch_size, ordered=True)  # type: ignore[arg-type]
            if x_adv.shape[1:] != x.shape[1:]:
                raise ValueError(f"adversarial inputs of shape {tuple(x_adv.shape[1:])} for clean inputs of shape "
                                 f"{tuple(x.shape[1:])}; to give labels, pass clean as an (x, y) pair")
        reference_x, reference_y = (x, y) if reference is None else as_tensors(reference, batch_size=batch_size)
        if reference_y is None:
            raise ValueError("fit prepares the detector on labelled inputs: give clean (or reference) as (x, y) "
                             "tensors, or a Dataset or DataLoader of (x, y)")
        with eval_mode(model):
            self.prepare(model, reference_x, reference_y, batch_size=batch_size)
            self.fit_signatures(self.signatures(model, x, batch_size=batch_size),
                                None if x_adv is None else self.signatures(model, x_adv, batch_size=batch_size))
        return self

    def predict(self, inputs: Inputs, *, batch_size: int = 64) -> np.ndarray:
        """Scores of ``inputs`` (any of :data:`Inputs`; labels ignored), shape [N] in their order:
        higher means more likely adversarial. :meth:`score_samples` of their :meth:`signatures`,
        as an audit scores its test inputs; the detector must be bound to a model and fitted."""
        model = self._bound_model("predict")
        x, _ = as_tensors(inputs, batch_size=batch_size, ordered=True)
        with eval_mode(model):
            return self.score_samples(self.signatures(model, x, batch_size=batch_size))

    def __call__(self, inputs: Inputs, *, batch_size: int = 64) -> np.ndarray:
        """:meth:`predict`."""
        return self.predict(inputs, batch_size=batch_size)

    def _bound_model(self, method: str) -> nn.Module:
        if self.model is None:
            cls = type(self).__name__
            raise ValueError(f"{cls}.{method} on inputs needs a model: create the detector as {cls}(model, ...)")
        return self.model

    @abstractmethod
    def score_samples(self, signatures: np.ndarray) -> np.ndarray:
        """Scores, shape [N]: higher means more likely adversarial."""

    def fitted_params(self) -> dict[str, Any]:
        """Hyperparameters chosen during :meth:`fit`, recorded in results."""
        return {}

    #: How :meth:`torch_scores` relates to ``score_samples(signatures(...))``: ``exact`` (equal to
    #: 1e-4 relative, gradients exact), ``bpda`` (equal values; a non-differentiable step, such as
    #: an input-preprocessing sign step, is the identity on the backward pass, Athalye et al. 2018),
    #: ``eot`` (equal values for the detector's own fixed random draws, averaged over them on the
    #: backward pass) or ``surrogate`` (a smooth stand-in for a step function: rank-close, not equal).
    gradient_kind: ClassVar[str] = "exact"

    def torch_scores(self, model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        """Scores of ``inputs`` (on the model's device, shape [N]) as a differentiable function of
        them, for an attacker who optimizes against the fitted detector (the ``adaptive`` protocol).
        Call after :meth:`prepare` and :meth:`fit`; no batching, no ``no_grad``."""
        raise NotImplementedError(f"{self.name} has no differentiable score")


def as_tensors(data: Inputs, *, batch_size: int = 64, ordered: bool = False) -> tuple[torch.Tensor,
                                                                                      torch.Tensor | None]:
    """``data`` (any of :data:`Inputs`) as one tensor of inputs on the CPU and one of labels (None
    when it has none), in its order; a ``Dataset`` is read through a ``DataLoader`` of ``batch_size``.
    ``ordered``: the order matters (scores, or (clean, adversarial) pairs, follow it), so a
    shuffling ``DataLoader`` is refused."""
    if isinstance(data, (torch.Tensor, tuple, list)):
        return _inputs_and_labels(data)
    if isinstance(data, Dataset):
        data = DataLoader(data, batch_size=batch_size)
    if not isinstance(data, DataLoader):
        raise TypeError("inputs must be a tensor, an (x, y) pair, a Dataset or a DataLoader; "
                        f"got {type(data).__name__}")
    if ordered and isinstance(data.sampler, (RandomSampler, SubsetRandomSampler, WeightedRandomSampler)):
        raise ValueError("this DataLoader shuffles, but its order matters here (scores, or (clean, adversarial) pairs, "
                         "follow it): pass one with shuffle=False")
    batches = [_inputs_and_labels(batch) for batch in data]
    if not batches:
        raise ValueError("the DataLoader yields no inputs")
    labels = [y for _, y in batches if y is not None]
    return torch.cat([x for x, _ in batches]), torch.cat(labels) if len(labels) == len(batches) else None


def _inputs_and_labels(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A tensor of inputs, or an ``(x, y)`` pair (a tuple or the list a ``DataLoader`` collates)."""
    if isinstance(batch, torch.Tensor):
        return batch.detach().cpu(), None
    if isinstance(batch, (tuple, list)) and len(batch) == 1 and isinstance(batch[0], torch.Tensor):
        return batch[0].detach().cpu(), None  # a TensorDataset of inputs alone
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[0], torch.Tensor):
        x, y = batch[0].detach().cpu(), torch.as_tensor(batch[1]).cpu()
        if y.ndim != 1 or len(y) != len(x):
            raise ValueError(f"labels must be one per input: got shape {tuple(y.shape)} for {len(x)} inputs")
        return x, y
    raise TypeError("inputs must be a tensor of inputs or an (x, y) pair of tensors; got "
                    f"{type(batch).__name__}{f' of {len(batch)}' if isinstance(batch, (tuple, list)) else ''}")


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode with gradients enabled (signatures read input gradients), as in an audit; the
    model's mode restored afterwards."""
    training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            yield
    finally:
        model.train(training)


def require_adversarial(detector: Detector, clean: np.ndarray, adversarial: np.ndarray | None) -> np.ndarray:
    if adversarial is None:
        raise ValueError(f"{detector.name} is supervised: fit it with clean and adversarial signatures")
    n = min(len(clean), len(adversarial))
    if n < 2:
        raise ValueError("need at least 2 clean and 2 adversarial inputs to fit; "
                         f"got {len(clean)} and {len(adversarial)}")
    return adversarial


def fit_logistic(clean: np.ndarray, adversarial: np.ndarray, *, Cs: Sequence[float] = DEFAULT_CS,
                 cv: int = 5, prefix: Sequence[Any] = ()) -> tuple[Pipeline, float, float]:
    """Standardize, then logistic regression with ``C`` chosen by cross-validated AUROC over folds
    that keep each (clean, adversarial) pair together. Returns (pipeline, C, cross-validated AUROC).

    The same search as ``GridSearchCV(make_pipeline(*prefix, StandardScaler(), LogisticRegression()),
    {"C": Cs}, cv=GroupKFold, scoring="roc_auc")`` (``prefix`` holds stateless transformers), written
    out so that each fold is standardized once for every ``C``, without the per-fit overhead of
    cloning, validating and scoring (:func:`rank_auroc`), which dominated an audit's detect stage;
    BLAS runs on one thread, faster than two on matrices this small."""
    n_splits = min(cv, len(clean), len(adversarial))
    features = np.concatenate([clean, adversarial])
    labels = np.r_[np.zeros(len(clean)), np.ones(len(adversarial))]
    paired = len(clean) == len(adversarial)
    groups = np.r_[np.arange(len(clean)), np.arange(len(adversarial)) + (0 if paired else len(clean))]
    transformed = make_pipeline(*prefix).fit_transform(features) if prefix else features
    scores = np.full((len(Cs), n_splits), np.nan)
    with threadpool_limits(1, user_api="blas"), sklearn.config_context(skip_parameter_validation=True):
        for fold, (train, test) in enumerate(GroupKFold(n_splits).split(transformed, labels, groups)):
            if len(np.unique(labels[test])) < 2:  # no AUROC: NaN, as GridSearchCV's error_score, and no fit
                continue
            scaler = StandardScaler().fit(transformed[train])
            x_train, x_test = scaler.transform(transformed[train]), scaler.transform(transformed[test])
            for i, C in enumerate(Cs):
                model = LogisticRegression(C=C, max_iter=5000).fit(x_train, labels[train])
                scores[i, fold] = rank_auroc(labels[test], x_test @ model.coef_[0] + model.intercept_[0])
        means = scores.mean(axis=1)
        best = int(np.nanargmax(means)) if not np.isnan(means).all() else 0
        pipeline = make_pipeline(*prefix, StandardScaler(), LogisticRegression(C=Cs[best], max_iter=5000))
        pipeline.fit(features, labels)
    return pipeline, float(Cs[best]), float(means[best])


def rank_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """AUROC as the Mann-Whitney statistic (ties count one half): sklearn's ``roc_auc_score``
    without its input checks, which cost more than the fits in a cross-validated search."""
    ranks = rankdata(scores)
    positive = labels == 1
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def logistic_torch(pipeline: Pipeline, features: torch.Tensor,
                   prefix: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """``pipeline.decision_function`` (a pipeline made by :func:`fit_logistic`) as torch operations
    on ``features`` [N, D], differentiable: ``prefix`` stands in for its stateless transformers
    (the torch twin of :func:`advdetect.detectors.confounding_gradient.log_features`, say), then
    the standardization and the linear decision function."""
    steps = [step for _, step in pipeline.steps]
    scaler, regression = steps[-2], steps[-1]
    if len(steps) > 2 and prefix is None:
        raise ValueError("the pipeline has a transformer before its scaler: give its torch twin as prefix")
    x = features.double()
    if prefix is not None:
        x = prefix(x)
    mean = torch.as_tensor(scaler.mean_, dtype=torch.float64, device=x.device)
    scale = torch.as_tensor(scaler.scale_, dtype=torch.float64, device=x.device)
    coef = torch.as_tensor(regression.coef_[0], dtype=torch.float64, device=x.device)
    return ((x - mean) / scale) @ coef + float(regression.intercept_[0])


def best_by_cv(candidates: dict[Any, tuple[Pipeline, float, float]]) -> tuple[Any, Pipeline, float]:
    """The candidate setting whose logistic regression has the best cross-validated AUROC
    (the first on ties, so the grid's order breaks them)."""
    best = max(candidates, key=lambda k: candidates[k][2])
    return best, candidates[best][0], candidates[best][1]
