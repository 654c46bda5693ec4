"""Small typed records that stages hand each other through the run folder.

Run folder layout (every file written atomically):

- ``run.json``: :class:`RunInfo`, what was audited and how; stage timings.
- ``sample.npz``: the audited inputs ``x`` (float32, [0, 1]), labels ``y``, clean predictions ``pred``.
- ``reference.npz``: clean reference inputs ``x`` and labels ``y``, disjoint from the sample.
- ``adversarial/<cell>.npz`` and ``.json``: one attack cell's outputs and :class:`AttackRecord`.
- ``detection.json``: :class:`ResultRow` list; ``scores/<cell>.npz``: test scores, keyed
  ``<protocol>__<detector>__clean`` and ``..__adversarial``.
- ``results.json``, ``report.html``, ``report.pdf``: the report stage's outputs.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field, fields
from typing import Any

RESULTS_SCHEMA = 1


def derive_seed(seed: int, *parts: object) -> int:
    """A stable 31-bit seed for one piece of work (Python's ``hash`` differs between runs)."""
    text = ":".join(map(str, (seed, *parts)))
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


class Record:
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: dict[str, Any]):  # type: ignore[no-untyped-def]
        names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class RunInfo(Record):
    suite: dict[str, Any]
    model: dict[str, Any]
    data: dict[str, Any]
    seed: int
    device: str
    batch_size: int
    fit_fraction: float
    detectors: list[str]
    clean_accuracy: float
    versions: dict[str, str]
    started_at: str
    cache_dir: str | None = None
    noisy_negatives: bool = False
    attack_cache_hits: int | None = None
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class AttackRecord(Record):
    key: str
    slug: str
    attack: str
    attack_name: str
    strength_name: str
    strength: float
    params: dict[str, Any]
    seed: int
    n_attacked: int
    n_fooled: int
    attack_success_rate: float | None
    mean_linf: float | None
    max_linf: float | None
    mean_l2: float | None
    max_l2: float | None
    seconds: float


@dataclass
class ResultRow(Record):
    attack: str
    strength_name: str
    strength: float
    detector: str
    protocol: str
    n_clean: int
    n_adv: int
    n_fit: int
    attack_success_rate: float | None
    auroc: float | None = None
    auroc_ci_low: float | None = None
    auroc_ci_high: float | None = None
    aupr_in: float | None = None
    aupr_out: float | None = None
    fpr_at_95tpr: float | None = None
    tnr_at_95tpr: float | None = None
    detection_accuracy: float | None = None
    negatives: str = "clean"
    reason: str | None = None
    detector_params: dict[str, Any] = field(default_factory=dict)
