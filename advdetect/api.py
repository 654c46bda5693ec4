"""The Python API: an audit of an ``nn.Module`` on tensors, a ``Dataset`` or a ``DataLoader`` (or
of specs), as one call.

    >>> result = advdetect.audit(model, (x, y), suite="default", out="reports/run1")
    >>> result.robust_accuracy, result.rows[0].auroc, result.verdict, result.report_html
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, SubsetRandomSampler, WeightedRandomSampler

from advdetect.config.suite import Suite
from advdetect.errors import UsageError
from advdetect.run.checks import Verdict, judge, plan_checks
from advdetect.run.folder import RUN_JSON
from advdetect.run.records import AttackRecord, OodRecord, ResultRow
from advdetect.stages.pipeline import run_audit
from advdetect.stages.preflight import build_options

#: What :func:`audit` audits on: a data spec, images [N, C, H, W] in [0, 1] and their labels, or a
#: ``Dataset``/``DataLoader`` of (image(s), label(s)) pairs.
Data = Union[str, tuple[torch.Tensor, torch.Tensor], "Dataset[Any]", "DataLoader[Any]"]

#: Samplers that draw another order (or other inputs) on each pass over a DataLoader.
SHUFFLING = (RandomSampler, SubsetRandomSampler, WeightedRandomSampler)
#: Inputs read per batch from a ``Dataset`` given as data.
READ_BATCH = 256


@dataclass(frozen=True)
class AuditResult:
    """What an audit produced: its run folder, its attack cells and detection rows (typed), the
    robust accuracy per cell, and the verdict of the suite's thresholds (None when the suite sets
    none). ``results`` is ``results.json`` as written, for what the properties do not cover."""

    run_dir: Path
    results: dict[str, Any]
    verdict: Verdict | None

    @property
    def document(self) -> dict[str, Any]:
        """``results.json`` as written (the name :attr:`results` had before)."""
        return self.results

    @property
    def rows(self) -> list[ResultRow]:
        """The detection rows: one per cell x detector x protocol (the adaptive protocol's last), as in
        ``results.json``."""
        return [ResultRow.from_dict(row) for row in self.results["results"]]

    @property
    def attacks(self) -> list[AttackRecord]:
        """One record per cell: attack success rate, robust accuracy and perturbation sizes."""
        return [AttackRecord.from_dict(record) for record in self.results["attacks"]]

    @property
    def robust_accuracy(self) -> dict[str, float | None]:
        """Per attack cell (by its key, ``pgd@eps=0.3``): the share of all audited inputs still
        classified correctly under the attack (None where no input could be attacked)."""
        return {record.key: record.robust_accuracy for record in self.attacks if not isinstance(record, OodRecord)}

    @property
    def clean_accuracy(self) -> float:
        return float(self.results["clean_accuracy"])

    @property
    def report_html(self) -> Path:
        return self.run_dir / "report.html"

    @property
    def report_pdf(self) -> Path:
        return self.run_dir / "report.pdf"

    @property
    def results_json(self) -> Path:
        return self.run_dir / "results.json"

    @property
    def run_json(self) -> Path:
        return self.run_dir / RUN_JSON


def audit(model: nn.Module | str = "default", data: Data = "default", *, suite: str | Suite = "default",
          out: str | Path | None = None, attacks: Sequence[str] | None = None, detectors: Sequence[str] | None = None,
          weights: str | Path | None = None, dataset: str = "cifar10", threat_model: str = "Linf",
          model_dir: str | Path = "./models", mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
          image_size: int | None = None, crop: int | None = None, n: int | None = 256, n_reference: int = 256,
          noisy_negatives: bool = False, seed: int = 0, device: str = "auto", batch_size: int = 128,
          fit_fraction: float = 0.2, fit_folds: int = 0, cache_dir: str | Path | None = None,
          cache: bool = True) -> AuditResult:
    """Audit ``model`` (an ``nn.Module`` taking inputs in [0, 1], or a model spec) on ``data`` (images
    [N, C, H, W] in [0, 1] and labels; a ``Dataset`` or an unshuffled ``DataLoader`` yielding such
    pairs, read whole and in order; or a data spec) with ``suite`` into the run folder ``out``
    (default ``reports/<timestamp>``). The keywords are the command line's audit options, with the
    same defaults, ranges and meaning (``advdetect audit --help``); ``n=None`` audits every input.
    Bad input raises :class:`advdetect.UsageError` before any work."""
    options = build_options(suite, model=model, data=data, out=out, attacks=attacks, detectors=detectors,
                            weights=weights, dataset=dataset, threat_model=threat_model, model_dir=model_dir,
                            mean=mean, std=std, image_size=image_size, crop=crop, n=n, n_reference=n_reference,
                            noisy_negatives=noisy_negatives, seed=seed, device=device, batch_size=batch_size,
                            fit_fraction=fit_fraction, fit_folds=fit_folds, cache_dir=cache_dir, cache=cache)
    if isinstance(data, (Dataset, DataLoader)):
        options = dataclasses.replace(options, data=read_pairs(data))
    checks = plan_checks(options.suite, options.detector_names())
    run_dir, document = run_audit(options, None if out is None else Path(out))
    verdict = judge(checks, document) if checks else None
    return AuditResult(run_dir, document, verdict)


def read_pairs(data: Dataset[Any] | DataLoader[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``Dataset``'s (image, label) items or a ``DataLoader``'s (images, labels) batches as two
    tensors, in order: the audit samples its inputs by position, so the same data gives the same
    audit as the tensors would."""
    if isinstance(data, DataLoader) and isinstance(data.sampler, SHUFFLING):
        raise UsageError("the DataLoader given as data draws its inputs at random, so each audit would sample "
                         "other ones; give its dataset (loader.dataset) or a DataLoader with shuffle=False")
    loader = data if isinstance(data, DataLoader) else DataLoader(data, batch_size=READ_BATCH)
    images, labels = [], []
    for i, batch in enumerate(loader):
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            got = f"{len(batch)} items" if isinstance(batch, (tuple, list)) else type(batch).__name__
            raise UsageError(f"data must yield (images, labels) pairs; batch {i} is {got}")
        images.append(torch.as_tensor(batch[0]))
        labels.append(torch.as_tensor(batch[1]))
    if not images:
        raise UsageError(f"the {type(data).__name__} given as data yields nothing")
    try:
        return torch.cat(images), torch.cat(labels)
    except RuntimeError as exc:
        raise UsageError(f"the batches of the {type(data).__name__} given as data do not stack: "
                         f"{str(exc).splitlines()[0]}") from None
