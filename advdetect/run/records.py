"""Small typed records that stages hand each other through the run folder (see
:mod:`advdetect.run.folder`). Reading one back checks every field's type, so a damaged file is
refused with the field it lacks instead of failing later."""

from __future__ import annotations

import functools
import hashlib
import re
import typing
from dataclasses import Field, asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar, Literal

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self from Python 3.11

RESULTS_SCHEMA = 1
#: Detection protocols, in the order results list them (see :mod:`advdetect.stages.detect`).
PROTOCOLS = ("seen", "unseen", "oneclass", "adaptive")
#: The protocol of rows measured against an attacker who optimizes against the detector
#: (:mod:`advdetect.stages.adaptive`).
ADAPTIVE = "adaptive"
#: The kind (and pseudo-attack name) of an out-of-distribution cell.
OOD = "ood"


def format_strength(value: float) -> str:
    """The shortest text that reads back as ``value``: ``0.1``, ``8/255`` as ``0.0313725``... only
    when that is exact, so two strengths never print alike."""
    short = format(value, "g")
    return short if float(short) == value else repr(float(value))


def display_strength(value: float) -> str:
    """A strength as tables show it: ``8/255`` where the exact value is a whole number of 255ths
    and has no short form, else :func:`format_strength`."""
    text = format_strength(value)
    steps = value * 255
    if len(text) > 8 and abs(steps - round(steps)) < 1e-9 and round(steps) > 0:
        return f"{round(steps)}/255"
    return text


def cell_key(attack: str, strength_name: str, strength: float) -> str:
    """``pgd[eps=0.1]``: how results, checks and history name one attack at one strength."""
    return f"{attack}[{strength_name}={format_strength(strength)}]"


def cell_slug(attack: str, strength_name: str, strength: float) -> str:
    """A file-name form of :func:`cell_key`; distinct keys of one suite give distinct slugs
    (the suite checks it)."""
    text = f"{attack}_{strength_name}-{format_strength(strength).replace('+', '')}"
    return re.sub(r"[^A-Za-z0-9_.-]", "-", text)


def ood_cell_key(set_name: str) -> str:
    """``ood[photos]``: an out-of-distribution set in the place of an attack cell."""
    return f"ood[{set_name}]"


def ood_cell_slug(set_name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "-", f"ood_{set_name}")


def cell_label(record: dict[str, Any], sep: str = "=") -> str:
    """How tables and figures name a cell within its attack: ``eps=0.1``, or an out-of-distribution
    set's name; ``record`` is a cell record's dict (as in ``results.json``)."""
    if record.get("kind") == OOD or record["attack"] == OOD:  # "kind" was added after OOD runs existed
        return str(record["params"]["set"])
    return f"{record['strength_name']}{sep}{display_strength(record['strength'])}"


def derive_seed(seed: int, *parts: object) -> int:
    """A stable 31-bit seed for one piece of work (Python's ``hash`` differs between runs)."""
    text = ":".join(map(str, (seed, *parts)))
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


@dataclass(frozen=True)
class AttackCell:
    """One attack at one strength: the unit of attack work and of every result row."""

    attack: str
    attack_name: str
    strength_name: str
    strength: float
    params: dict[str, Any] = field(hash=False)

    @property
    def key(self) -> str:
        return cell_key(self.attack, self.strength_name, self.strength)

    @property
    def slug(self) -> str:
        return cell_slug(self.attack, self.strength_name, self.strength)

    def constructor_params(self) -> dict[str, Any]:
        return {**self.params, self.strength_name: self.strength}


class Record:
    """A record of the run folder: a dataclass whose field declarations are its JSON form. Reading
    one back is validated by pydantic from those declarations (:func:`validator`), so a new field is
    one edit: its declaration, which also reaches the shipped JSON Schemas (:mod:`advdetect.run.schemas`)."""

    #: pydantic's ``ConfigDict`` for the generated validator: JSON types as written (no ``"0.1"`` for
    #: 0.1, no ``true`` for 1), finite numbers only; keys a record does not know are ignored
    __pydantic_config__: ClassVar[dict[str, Any]] = {"strict": True, "allow_inf_nan": False}

    if TYPE_CHECKING:
        #: set by ``@dataclass`` on each record class; declared so that type checkers take a record for
        #: the dataclass it is (``asdict``, ``fields``)
        __dataclass_fields__: ClassVar[dict[str, Field[Any]]]

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> Any:
        """Strict fields, but the record itself read from a JSON object (pydantic's strict mode
        would want an instance of the dataclass)."""
        schema = handler(source)
        if schema["type"] == "dataclass":
            schema["strict"] = False
        return schema

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> Self:
        """The record from its JSON form; ValueError naming the first field that is missing or of
        the wrong type. Keys it does not know are ignored (written by a newer version). The values
        are kept as read (an integral strength stays an int, so a file read and written back is
        unchanged); records nested in a field (:class:`Results`' ``attacks``) stay JSON objects,
        checked, for their own record's ``from_dict``."""
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, found {type(data).__name__}")
        from pydantic import ValidationError

        try:
            # mypy takes a class object for unhashable (python/mypy#11470); functools.cache hashes it fine
            validator(cls).validate_python(data)  # type: ignore[arg-type]
        except ValidationError as exc:
            first = exc.errors()[0]  # in field order, as the declarations list them
            name = str(first["loc"][0])  # a field's name: the record is validated as a whole
            if first["type"] == "missing":
                raise ValueError(f"the field {name!r} is missing") from None
            hint = typing.get_type_hints(cls)[name]
            raise ValueError(f"the field {name!r} is {json_preview(data[name])}, not {_hint_text(hint)}") from None
        record = cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})
        record.check()
        return record

    def check(self) -> None:
        """Raise ValueError when values contradict each other."""


@functools.cache
def validator(cls: type[Record]) -> Any:
    """pydantic's ``TypeAdapter`` of a record class: its validator and its JSON Schema."""
    from pydantic import TypeAdapter

    return TypeAdapter(cls)


def json_preview(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _hint_text(hint: Any) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


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
    #: K >= 2: the supervised detectors were cross-fitted over K folds (0: one fit_fraction split)
    fit_folds: int = 0
    attack_cache_hits: int | None = None
    timings: dict[str, float] = field(default_factory=dict)
    #: seconds of the detect stage spent on each detector: preparing, signatures, fitting and
    #: scoring; a signature shared by several detectors is charged to the first that needs it
    detector_timings: dict[str, float] = field(default_factory=dict)
    #: the model passes per input each detector made in the detect stage, ``{"forward": F,
    #: "backward": B}``, charged as its seconds are (with torchrun: rank 0's share)
    detector_passes: dict[str, dict[str, int]] = field(default_factory=dict)
    #: seconds of the adaptive stage spent on each detector (refit, attack, scoring)
    adaptive_timings: dict[str, float] = field(default_factory=dict)
    #: (key, slug) of every cell, in suite order: the attack cells, or an OOD run's sets
    cells: list[list[str]] = field(default_factory=list)
    #: each stage's state, "running" or "complete": a report needs a complete detect stage
    stages: dict[str, str] = field(default_factory=dict)
    #: this run's identity (a uuid4 hex); empty in a run folder written before files were bound to their run
    run_id: str = ""
    #: every file the run wrote, by path relative to the run folder: {"sha256": its hash, "inputs":
    #: {path: hash} of the files it was computed from}; readers refuse a file that does not match
    files: dict[str, dict[str, Any]] = field(default_factory=dict)

    def check(self) -> None:
        for cell in self.cells:
            if len(cell) != 2 or not is_slug(cell[1]):
                raise ValueError(f"the cell entry {json_preview(cell)} is not a [key, file name] pair")
        for name, entry in self.files.items():
            if not (is_relative(name) and isinstance(entry.get("sha256"), str) and isinstance(entry.get("inputs"), dict)
                    and all(is_relative(k) and isinstance(v, str) for k, v in entry["inputs"].items())):
                raise ValueError(f"the files entry {json_preview(name)} is not {{sha256, inputs: {{path in the run "
                                 f"folder: sha256}}}}")
        if (not 0 <= self.clean_accuracy <= 1 or not 0 < self.fit_fraction < 1 or self.batch_size < 1
                or self.fit_folds < 0 or self.fit_folds == 1):
            raise ValueError("clean_accuracy, fit_fraction, fit_folds or batch_size is out of range")


def is_slug(text: str) -> bool:
    """A file name of the run folder: no separator, not hidden."""
    return re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", text) is not None


def is_relative(text: str) -> bool:
    """A path inside the run folder, as run.json's ``files`` names them: file names joined by ``/``."""
    return all(is_slug(part) for part in text.split("/"))


def _fractions(record: Record, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(record, name)
        if value is not None and not -1e-9 <= value <= 1 + 1e-9:  # rounding of earlier versions
            raise ValueError(f"the field {name!r} is {value}, outside [0, 1]")


@dataclass
class AttackRecord(Record):
    """One cell of a run: an attack at one strength, what it did and what it cost. An
    out-of-distribution set takes a cell's place as an :class:`OodRecord`."""

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
    kind: str = "attack"
    #: share of all audited inputs still classified correctly under this attack, with its Wilson 95% interval
    robust_accuracy: float | None = None
    robust_accuracy_ci_low: float | None = None
    robust_accuracy_ci_high: float | None = None
    #: the model passes, per input, that the cell made in this run beside its ``seconds`` (the attack's, none
    #: on a cache hit, and the forward pass classifying its adversarial inputs); None where not counted
    forward_passes: int | None = None
    backward_passes: int | None = None

    @property
    def label(self) -> str:
        return cell_label(self.to_dict())

    @classmethod
    def from_dict(cls, data: Any):  # type: ignore[no-untyped-def]
        """The record of its kind: an :class:`OodRecord` for an out-of-distribution cell."""
        if cls is AttackRecord and isinstance(data, dict) and OOD in (data.get("kind"), data.get("attack")):
            return OodRecord.from_dict({**data, "kind": OOD})
        return super().from_dict(data)

    def check(self) -> None:
        if not is_slug(self.slug):
            raise ValueError(f"the field 'slug' is {json_preview(self.slug)}, not a plain file name")
        if not 0 <= self.n_fooled <= self.n_attacked:
            raise ValueError(f"n_fooled {self.n_fooled} is not between 0 and n_attacked {self.n_attacked}")
        _fractions(self, ("attack_success_rate", "robust_accuracy", "robust_accuracy_ci_low",
                          "robust_accuracy_ci_high"))


@dataclass
class OodRecord(AttackRecord):
    """An out-of-distribution set in the place of an attack cell: ``n_fooled`` counts the set's
    inputs (the positives), paired row by row with the correctly classified clean inputs."""

    kind: str = OOD

    @classmethod
    def for_set(cls, name: str, spec: str, index: int, *, seed: int, n_clean: int, n_inputs: int,
                seconds: float) -> OodRecord:
        return cls(key=ood_cell_key(name), slug=ood_cell_slug(name), attack=OOD, attack_name=OOD,
                   strength_name="set", strength=float(index), params={"set": name, "spec": spec}, seed=seed,
                   n_attacked=n_clean, n_fooled=n_inputs, attack_success_rate=None, mean_linf=None, max_linf=None,
                   mean_l2=None, max_l2=None, seconds=seconds)

    def check(self) -> None:
        super().check()
        if not isinstance(self.params.get("set"), str):
            raise ValueError("an out-of-distribution cell's params lack its set's name")


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
    #: share of the adversarial inputs flagged at the threshold that flags 5% of clean inputs
    tpr_at_5fpr: float | None = None
    #: share of the attacked inputs that the attack fooled and the detector, at that threshold,
    #: let through: what an attacker gets past classifier and detector together
    undetected_success_rate: float | None = None
    negatives: str = "clean"
    reason: str | None = None
    detector_params: dict[str, Any] = field(default_factory=dict)
    #: adaptive rows only: the same measures for the oblivious attack of the same budget on the
    #: same test inputs, at the same threshold
    oblivious_auroc: float | None = None
    oblivious_tpr_at_5fpr: float | None = None
    oblivious_undetected_success_rate: float | None = None
    oblivious_attack_success_rate: float | None = None

    def check(self) -> None:
        if min(self.n_clean, self.n_adv, self.n_fit) < 0:
            raise ValueError("a count (n_clean, n_adv, n_fit) is negative")
        _fractions(self, ("attack_success_rate", "auroc", "auroc_ci_low", "auroc_ci_high", "aupr_in", "aupr_out",
                          "fpr_at_95tpr", "tnr_at_95tpr", "detection_accuracy", "tpr_at_5fpr",
                          "undetected_success_rate", "oblivious_auroc", "oblivious_tpr_at_5fpr",
                          "oblivious_undetected_success_rate", "oblivious_attack_success_rate"))
        if self.auroc is None and not self.reason:
            raise ValueError("a row without AUROC gives no reason")
        if None not in (self.auroc, self.auroc_ci_low, self.auroc_ci_high) and not \
                self.auroc_ci_low - 1e-9 <= self.auroc <= self.auroc_ci_high + 1e-9:  # type: ignore[operator]
            raise ValueError(f"the AUROC {self.auroc} lies outside its interval "
                             f"[{self.auroc_ci_low}, {self.auroc_ci_high}]")


#: A threshold check's outcome (see :mod:`advdetect.run.checks`).
Status = Literal["PASSED", "FAILED", "SKIPPED"]


@dataclass
class CheckRecord(Record):
    """One threshold check's outcome as ``results.json`` keeps it."""

    nodeid: str
    status: Status
    value: float | None
    message: str


@dataclass
class VerdictRecord(Record):
    """The suite's threshold checks on one audit as ``results.json`` keeps them: the counts, and
    every check's outcome in suite order."""

    passed: int
    failed: int
    skipped: int
    checks: list[CheckRecord]

    def __str__(self) -> str:
        return f"{self.passed} passed, {self.failed} failed, {self.skipped} skipped"


@dataclass
class Results(Record):
    """``results.json``, the report stage's record of a run: what was audited (from ``run.json``),
    every cell's record, every result row (the adaptive protocol's last), robust accuracy's per-input
    worst case per threat model and strength, the gradient-masking checks and the verdict of the
    suite's thresholds (None when it sets none). Its JSON Schema ships as
    ``advdetect/run/schemas/results.schema.json``."""

    schema: int
    clean_accuracy: float
    model: dict[str, Any]
    data: dict[str, Any]
    suite: dict[str, Any]
    seed: int
    device: str
    fit_fraction: float
    fit_folds: int
    versions: dict[str, str]
    started_at: str
    timings: dict[str, float]
    detector_timings: dict[str, float]
    detector_passes: dict[str, dict[str, int]]
    attacks: list[AttackRecord]
    results: list[ResultRow]
    adaptive_timings: dict[str, float]
    #: one bucket per threat model and strength (see :func:`advdetect.run.robustness.worst_case`)
    robust_accuracy: list[dict[str, Any]]
    #: the symptoms checked (see :mod:`advdetect.attacks.masking`); None when the checks did not run
    gradient_masking: dict[str, Any] | None
    verdict: VerdictRecord | None
