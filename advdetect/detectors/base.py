"""The detector interface: signatures from a model, then an estimator on those signatures."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar, Sequence

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

#: Computes one block of signatures: ``(model, inputs, *, batch_size) -> [N, D]``.
SignatureFunction = Callable[..., np.ndarray]

#: Inverse regularization strengths the supervised detectors choose from by cross-validation.
DEFAULT_CS: tuple[float, ...] = tuple(float(c) for c in 10.0 ** np.arange(-3, 4))


class Detector(BaseEstimator, ABC):
    """Scores inputs; higher means more likely adversarial (or out-of-distribution).

    Three steps, so that a signature is computed once per input and reused across fits:

    1. :meth:`prepare` fits whatever lives in the model's own space on clean reference inputs
       (class-conditional Gaussians, kernel densities, neighbour pools); most detectors need none.
    2. :meth:`signatures` maps inputs through the model to per-input arrays, shape [N, D].
    3. :meth:`fit` / :meth:`score_samples` work on those arrays alone, like a scikit-learn estimator:
       ``fit(clean)`` with clean signatures only, ``fit(clean, adversarial)`` with both.

    Hyperparameters are public constructor arguments (``get_params``); fitted state ends in ``_``.
    """

    name: ClassVar[str]
    #: :meth:`fit` cannot work without adversarial examples (a supervised detector).
    needs_adversarial: ClassVar[bool] = False
    #: :meth:`fit` uses adversarial examples when it gets them (to tune or to combine features),
    #: so the result depends on which attack it saw: the ``unseen`` protocol applies.
    uses_adversarial: ClassVar[bool] = False

    def validate(self) -> None:
        """Raise ValueError on a bad hyperparameter, before any work."""

    def check_model(self, model: nn.Module) -> None:
        """Raise ValueError when a hyperparameter cannot apply to ``model`` (checked before an audit's work)."""

    def inputs_at_once(self, batch_size: int) -> int:
        """The most inputs one forward pass of :meth:`signatures` holds at ``batch_size``, so an
        audit can refuse settings that cannot fit in memory before any work."""
        return batch_size

    def prepare(self, model: nn.Module, reference: torch.Tensor, labels: torch.Tensor, *, batch_size: int = 64) -> "Detector":
        """Fit model-space state on clean reference inputs with their labels."""
        return self

    @abstractmethod
    def signatures(self, model: nn.Module, inputs: torch.Tensor, *, batch_size: int = 64) -> np.ndarray:
        """Per-input signatures, shape [N, D], of an eval-mode model taking inputs in [0, 1]."""

    def signature_key(self) -> tuple:
        """Detectors with equal keys compute equal signatures, so an audit computes them once."""
        return (type(self).__name__, id(self))

    def signature_blocks(self) -> list[tuple[tuple, SignatureFunction]]:
        """The signature as column blocks side by side, each a (key, function) pair with the
        arguments of :meth:`signatures`: detectors whose signatures differ but share a block (a
        variant that adds columns to another's) compute that block once in an audit. By default
        one block, the whole signature."""
        return [(self.signature_key(), self.signatures)]

    def fit(self, clean: np.ndarray, adversarial: np.ndarray | None = None) -> "Detector":
        """Fit on signatures of clean and (optionally) adversarial inputs. When both have the same
        length, rows with the same index are a (clean, adversarial) pair of one source input."""
        return self

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


def require_adversarial(detector: Detector, clean: np.ndarray, adversarial: np.ndarray | None) -> np.ndarray:
    if adversarial is None:
        raise ValueError(f"{detector.name} is supervised: fit it with clean and adversarial signatures")
    n = min(len(clean), len(adversarial))
    if n < 2:
        raise ValueError(f"need at least 2 clean and 2 adversarial inputs to fit; got {len(clean)} and {len(adversarial)}")
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
            scaler = StandardScaler().fit(transformed[train])
            x_train, x_test = scaler.transform(transformed[train]), scaler.transform(transformed[test])
            for i, C in enumerate(Cs):
                model = LogisticRegression(C=C, max_iter=5000).fit(x_train, labels[train])
                if len(np.unique(labels[test])) == 2:  # else NaN, as GridSearchCV's error_score
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
